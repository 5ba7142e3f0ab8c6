"""The evaluation schedule in the units the pruners and Ray's schedulers count: training examples seen.

``first_evaluation_step`` (a trial's first dev evaluation) and ``longest_epochs`` (the longest run the search
space allows) are the defaults of the halving pruners (``strategy.build_pruner``) and of Ray's schedulers
(``backends.ray_backend.schedulers.build_scheduler``): one reading of the schedule for both backends.
"""

from __future__ import annotations

from optuna.distributions import CategoricalDistribution, IntDistribution

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.search.spaces import SearchSpace

__all__ = ["first_evaluation_step", "longest_epochs"]


def first_evaluation_step(cfg: StudyConfig, n_train: int) -> int:
    """The step of a trial's first dev evaluation, in training examples seen (train.py's evaluation points)."""
    return max(1, cfg.train.evaluation_points(n_train)[0])


def longest_epochs(cfg: StudyConfig, space: SearchSpace | None) -> int:
    """The most epochs a trial of the study can run: the search space's largest ``epochs``, else the config's."""
    epochs = space.get("epochs") if space is not None else None
    if isinstance(epochs, IntDistribution):
        return int(epochs.high)
    if isinstance(epochs, CategoricalDistribution):
        return max(int(c) for c in epochs.choices)
    return cfg.train.epochs
