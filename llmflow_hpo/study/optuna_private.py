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
from optuna.trial import FrozenTrial

__all__ = [
    "create_trial",
    "record_heartbeat",
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
