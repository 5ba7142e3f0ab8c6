"""Stage 6, the study: where trials are stored and what a stored trial and study carry.

``urls`` (where a study's database is), ``storage`` (opening the storage and the study), ``lock`` (one worker at
a time claims a trial), ``provenance`` (the stored config and versions, the compatibility checks), ``records``
(every user attribute, declared once), ``note`` (the dashboard note), ``view`` (counts, the best trial, formats:
what every reader shows), ``front`` (a quality-against-cost study's Pareto front and pick). Everything is
optuna's SQLAlchemy storage underneath; nothing here imports torch.
"""
