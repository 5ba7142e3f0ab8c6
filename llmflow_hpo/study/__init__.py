"""Stage 6, the study: where trials are stored (``storage``), and what a stored trial and study carry.

Everything here is optuna's SQLAlchemy storage underneath; nothing here imports torch.
"""
