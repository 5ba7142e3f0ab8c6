"""Stage 5, search: ``driver`` runs a search (features, study, sampler and pruner, messages, tracking, summary)
and hands trials to a backend (``backends/``: optuna workers, or Ray Tune). ``spaces`` reads the search space,
``strategy`` builds sampler and pruner, ``schedule`` says when trials are evaluated, ``objective`` runs the
recipe for one trial, ``reporting`` holds the rules of what a trial reports and stores (both backends call
them), ``preflight`` checks what would fail in the first trial, ``workers`` starts ``--workers N`` processes,
``confirm`` re-runs the best configurations over several seeds (``llmflow-hpo confirm``).
"""
