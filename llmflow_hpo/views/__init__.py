"""Views: read a study, never steer it. ``progress`` (the terminal while a search runs), ``tracking`` (MLflow
and TensorBoard), ``report`` (the offline HTML report), ``dashboard`` (optuna-dashboard on the storage).
They count and rank trials through ``study.view`` and name trial attributes through ``study.records``.
"""
