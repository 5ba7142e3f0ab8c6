"""Stage 5, search: the search space (``spaces``), sampler and pruner (``strategy``), the objective that runs
the recipe for one trial (``objective``), what a trial reports (``reporting``), and the backends that run trials.
"""
