"""The one place that reaches into optuna's private attributes (``study._storage``, ``study._study_id``,
``trial._trial_id``); everything else calls these functions.

optuna offers no public handle for what these do: a trial's heartbeat (its own heartbeat thread is
private to ``Study.optimize``), the stored state of a trial by its id, a user attribute of a FrozenTrial,
and a trial created with its parameters whose number is returned (``study.add_trial`` returns nothing).
If optuna renames an attribute, this module is the only one to change.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

__all__ = [
    "FirstObjective",
    "create_trial",
    "record_heartbeat",
    "report_intermediate",
    "set_trial_user_attr",
    "storage_of",
    "stored_trial",
    "trial_id",
]


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage object the study reads and writes (shared with Ray's ``OptunaSearch``)."""
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's key in the storage (not its number within the study)."""
    return trial._trial_id


def record_heartbeat(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> None:
    """Write the trial's heartbeat now (the storage must have been opened with a heartbeat interval)."""
    storage_of(study).record_heartbeat(trial_id(trial))


def stored_trial(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> FrozenTrial:
    """The trial as the storage holds it now (another worker may have finished it meanwhile)."""
    return storage_of(study).get_trial(trial_id(trial))


def set_trial_user_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Set a user attribute of a trial known only as a FrozenTrial (one this process did not ask)."""
    storage_of(study).set_trial_user_attr(trial_id(trial), key, value)


def create_trial(study: optuna.Study, template: FrozenTrial) -> tuple[int, int]:
    """Store ``template`` (state, parameters, user attributes) as a new trial; returns (number, trial id)."""
    storage = storage_of(study)
    new_id = storage.create_new_trial(study._study_id, template_trial=template)
    return storage.get_trial_number_from_id(new_id), new_id


def report_intermediate(trial: optuna.Trial, step: int, value: float) -> None:
    """Store an intermediate value of a trial of a two-objective study, where ``trial.report`` refuses
    (optuna issue #3450): the storage takes it as from a single-objective trial, so the learning curves, the
    retry of a dead trial (which inherits them) and ``FirstObjective``'s pruner read it the same way."""
    trial.study._storage.set_trial_intermediate_value(trial._trial_id, step, value)


class FirstObjective:
    """A two-objective study seen as the single-objective study of its first value, for its pruner.

    optuna's pruners read a study's ``direction`` (which raises on a two-objective study), its trials'
    intermediate values and, for successive halving, the storage (rung attributes); this view answers
    ``direction`` with the first objective's and hands everything else to the study. Hyperband builds
    studies of its own from the storage and cannot run on it (config/study.py refuses it).
    """

    def __init__(self, study: optuna.Study, direction: str) -> None:
        self._study = study
        self.direction = StudyDirection[direction.upper()]

    @property
    def directions(self) -> list[StudyDirection]:
        return [self.direction]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def should_prune(self, trial: optuna.Trial) -> bool:
        """The study's pruner on the trial as stored now (what ``Trial.should_prune`` does)."""
        return self._study.pruner.prune(self, stored_trial(self._study, trial))  # type: ignore[arg-type]
