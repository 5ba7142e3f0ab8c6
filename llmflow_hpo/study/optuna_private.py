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
    "MetricDirection",
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
    storage_of(trial.study).set_trial_intermediate_value(trial_id(trial), step, value)


class MetricDirection:
    """A quality-against-cost study as its sampler sees it: both directions, and ``direction`` (which a
    two-objective study refuses) answered with the metric's. optuna's TPE ranks the pruned trials it learns
    from by their last intermediate value in ``study.direction``: optuna's own two-objective trials have none,
    a cost study's do (``report_intermediate``)."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    @property
    def direction(self) -> StudyDirection:
        return self._study.directions[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class FirstObjective:
    """A quality-against-cost study seen as the single-objective study of its metric, for its pruner, among
    the trials that cost no more than the one judged.

    optuna's pruners read a study's ``direction`` (which raises on a two-objective study), its trials and
    their intermediate values and, for successive halving, the storage (rung attributes); this view answers
    ``direction`` with the metric's, hands the pruner only the trials whose ``cost_attribute`` is at most the
    judged trial's (those that could dominate it: a cheap trial is not pruned for being behind costlier
    ones), and everything else to the study. A trial whose cost is not known yet (peak memory, known at the
    end) is judged against all. Hyperband builds studies of its own from the storage and cannot run on it
    (config/study.py refuses it).
    """

    def __init__(self, study: optuna.Study, direction: str, cost_attribute: str) -> None:
        self._study, self._attribute = study, cost_attribute
        self.direction = StudyDirection[direction.upper()]
        self._cap: float | None = None  # the judged trial's cost

    @property
    def directions(self) -> list[StudyDirection]:
        return [self.direction]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        if self._cap is None:
            return trials
        cap, key = self._cap, self._attribute
        return [t for t in trials if t.user_attrs.get(key) is not None and t.user_attrs[key] <= cap]

    def should_prune(self, trial: optuna.Trial) -> bool:
        """The study's pruner on the trial as stored now (what ``Trial.should_prune`` does), among its peers."""
        frozen = stored_trial(self._study, trial)
        self._cap = frozen.user_attrs.get(self._attribute)
        return self._study.pruner.prune(self, frozen)  # type: ignore[arg-type]
