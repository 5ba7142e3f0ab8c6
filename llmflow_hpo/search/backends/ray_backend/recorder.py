"""In the driver: the study's trials, written as Ray reports them, and the searcher that asks the study.

``StudyRecorder`` (a Ray Tune callback) writes every evaluation as the trial's intermediate value at its
step, and the end of every trial: COMPLETE with the best dev metric, PRUNED when the scheduler stopped it,
FAIL with the reason (``reporting.record_failure``) when it failed more than ``ray.max_failures`` times.
``StudySearch`` is Ray's ``OptunaSearch`` on the study itself; it only asks. Only the driver opens the
storage; Ray's workers never do.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from llmflow_hpo.errors import TrialFailure
from llmflow_hpo.search.backends.ray_backend.schedulers import STEP
from llmflow_hpo.search.budget import Budget
from llmflow_hpo.search.driver import say_on_stderr
from llmflow_hpo.search.reporting import record_failure
from llmflow_hpo.search.spaces import SearchSpace
from llmflow_hpo.study import records
from llmflow_hpo.study.optuna_private import create_trial, trial_id
from llmflow_hpo.study.view import search_trials
from llmflow_hpo.views.progress import Progress, as_progress
from llmflow_hpo.views.tracking import Tracking

__all__ = ["DRIVER", "StudyRecorder", "StudySearch", "drop_checkpoints", "trial_error"]

# The progress display and trackers of the searches this driver runs, by study name: the StudyRecorder
# (a Ray callback in this process, pickled with the run's state and restored from it) finds them here.
DRIVER: dict[str, tuple[Progress, Tracking]] = {}


class StudyRecorder(tune.Callback):
    """A Ray Tune callback that writes every Ray trial into the optuna study (see the module docstring).

    The study is opened lazily and not pickled: Ray saves the callback with its experiment state, and a
    restored one finds its trials again by their ``ray_trial_id``.
    """

    def __init__(
        self,
        *,
        storage: str,
        study_name: str,
        space: SearchSpace,
        key: str,
        metric: str,
        run: str,
        scheduler: str,
        target: int,
        direction: str = "maximize",
    ) -> None:
        self.direction = direction
        self.storage, self.study_name, self.space = storage, study_name, space
        self.key, self.metric, self.run, self.scheduler, self.target = key, metric, run, scheduler, target
        self._study: optuna.Study | None = None
        self._numbers: dict[str, int] = {}
        self._ids: dict[str, int] = {}  # Ray trial id -> optuna's trial id (storage key)
        self._last_step: dict[str, int] = {}
        self._params: dict[str, dict[str, Any]] = {}
        self._workers: dict[str, str] = {}  # where each trial runs now ("host:pid"; a retried trial moves)
        self._progress: Progress | None = None  # the search's display (not pickled, found when needed)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_study=None, _numbers={}, _ids={}, _last_step={}, _params={}, _workers={}, _progress=None)
        return state

    @property
    def progress(self) -> Progress:
        """The search's progress display (the Ray backend registers it), else lines on stderr."""
        if self._progress is None:
            driver = DRIVER.get(self.study_name)
            self._progress = driver[0] if driver else as_progress(say_on_stderr)
            self._progress.start(study=self.study, target=self.target, metric=self.metric, direction=self.direction)
        return self._progress

    @property
    def tracking(self) -> Tracking | None:
        """The driver's trackers (the Ray backend registers them; a restored recorder finds them the same way)."""
        driver = DRIVER.get(self.study_name)
        return driver[1] if driver else None

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            from llmflow_hpo.study.storage import open_storage

            self._study = optuna.load_study(
                study_name=self.study_name,
                storage=open_storage(self.storage),
                sampler=optuna.samplers.RandomSampler(),  # the recorder never samples
            )
        return self._study

    def _number(self, trial: Any) -> int:
        """The study trial of a Ray trial: asked by the searcher (tagged with the Ray trial id), or made here."""
        tid = trial.trial_id
        if tid in self._numbers:
            return self._numbers[tid]
        for t in self.study.get_trials(deepcopy=False):
            if t.user_attrs.get(records.RAY_TRIAL_ID) == tid and t.user_attrs.get(records.RAY_RUN) == self.run:
                self._numbers[tid], self._ids[tid] = t.number, trial_id(t)
                self._last_step[tid] = max(t.intermediate_values, default=-1)
                return t.number
        # Created RUNNING with its parameters, not enqueued and asked: ``ask`` takes the oldest WAITING
        # trial, which may be another one (a retry the optuna backend queued).
        params = {name: trial.config[name] for name in self.space}
        frozen = optuna.trial.create_trial(
            state=TrialState.RUNNING,
            params=params,
            distributions=dict(self.space),
            user_attrs={records.RAY_TRIAL_ID: tid, records.RAY_RUN: self.run, records.BACKEND: "ray"},
        )
        self._numbers[tid], self._ids[tid] = create_trial(self.study, frozen)
        self._last_step[tid] = -1
        return self._numbers[tid]

    def _trial(self, trial: Any) -> optuna.Trial:
        self._number(trial)
        return optuna.Trial(self.study, self._ids[trial.trial_id])

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        number = self._number(trial)
        started = trial.trial_id not in self._params
        params = self._params.setdefault(trial.trial_id, {name: trial.config[name] for name in self.space})
        if started and self.tracking is not None:
            self.tracking.trial_started(number, params)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        t = self._trial(trial)
        step = int(result[STEP])
        if step > self._last_step.get(trial.trial_id, -1):
            t.report(float(result[self.key]), step)
            self._last_step[trial.trial_id] = step
            if self.tracking is not None:
                metrics = result.get("metrics") or {self.metric: float(result[self.key])}
                self.tracking.evaluation(t.number, step, metrics, result.get("train_loss"))
        worker = (result.get("attrs") or {}).get(records.WORKER)
        if worker and self._workers.get(trial.trial_id) != worker:  # shown while it runs, as the optuna backend does
            t.set_user_attr(records.WORKER, worker)
            self._workers[trial.trial_id] = worker
        params = {name: trial.config.get(name) for name in self.space}
        before = self._params.setdefault(trial.trial_id, params)
        if params != before:  # PBT exploited another trial and mutated: record the new parameters
            schedule = list(t.user_attrs.get(records.PBT_SCHEDULE, []))
            schedule.append({"step": step, "params": params})
            t.set_user_attr(records.PBT_SCHEDULE, schedule)
            self._params[trial.trial_id] = params

    def _finish(
        self,
        trial: Any,
        state: TrialState,
        value: float | None,
        attrs: dict[str, Any],
        failure: tuple[str, bool] | None = None,
    ) -> None:
        t = self._trial(trial)
        for key, val in attrs.items():
            t.set_user_attr(key, val)
        if failure is not None:
            record_failure(t, failure[0], for_good=failure[1])
        t.set_user_attr(records.RAY_FAILURES, int(trial.num_failures))
        frozen = self.study.tell(t, value, state=state, skip_if_finished=True)
        self.progress.trial_finished(self.study, frozen)
        if self.tracking is not None:
            self.tracking.trial_finished(frozen)
        if self.scheduler != "pbt":  # PBT may still clone a finished trial's checkpoint
            drop_checkpoints(trial)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        attrs = dict(last.get("attrs") or {})
        if last.get("final"):
            self._finish(trial, TrialState.COMPLETE, float(last["best_value"]), attrs)
        elif STEP in last:
            attrs.update({records.PRUNED_AT_STEP: int(last[STEP]), records.STOPPED_BY: self.scheduler})
            self._finish(trial, TrialState.PRUNED, None, attrs)
        else:
            failure = ("the trial ended without reporting an evaluation", False)
            self._finish(trial, TrialState.FAIL, None, attrs, failure)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        self._finish(trial, TrialState.FAIL, None, dict(last.get("attrs") or {}), trial_error(trial))

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        number = self._number(trial)
        self.progress(
            f"trial {number:3d} failed ({trial_error(trial)[0]}); Ray restarts it from its last checkpoint "
            f"(failure {trial.num_failures}, ray.max_failures={trial.max_failures})"
        )


def drop_checkpoints(trial: Any) -> None:
    """A finished trial's checkpoints in a local ``ray.dir`` (Ray keeps them; nothing resumes them now)."""
    path = trial.path
    if not path or "://" in path or not Path(path).is_dir():
        return
    for folder in Path(path).glob("checkpoint_*"):
        shutil.rmtree(folder, ignore_errors=True)


def trial_error(trial: Any) -> tuple[str, bool]:
    """A failed Ray trial's ``fail_reason`` and whether it failed for good (it raised ``TrialFailure``).

    The reason is the last line of its error (the exception itself), or its type when there is none. A
    ``TrialFailure`` (diverged, a non-finite dev metric, out of memory) gives its reason alone, the
    ``fail_reason`` the optuna backend stores for it, and is failed for good as there.
    """
    text = ""
    with contextlib.suppress(Exception):
        text = str(trial.get_pickled_error() or trial.get_error() or "")
    if not text:
        with contextlib.suppress(Exception):
            text = Path(trial.error_file).read_text()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "error (see Ray's trial log)", False
    failure = f"{TrialFailure.__module__}.{TrialFailure.__name__}: "
    if lines[-1].startswith(failure):
        return lines[-1][len(failure) :], True
    return f"error: {lines[-1]}", False


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch on the study itself: it asks the study's sampler, in the study's storage.

    It only asks: ``StudyRecorder`` reports and tells, so a trial's steps are the study's steps (examples
    seen, not Ray's iteration count), its value is its best evaluation (not the last one), and a trial the
    scheduler stopped is PRUNED (OptunaSearch would record it COMPLETE with its last value). Its two
    private attributes of ``OptunaSearch`` (the trials it asked, the ones it counts as completed) are read
    and written here only. ``budget``: once half a typical trial no longer fits, it suggests nothing more
    (``Searcher.FINISHED``: Ray ends the run when its running trials end), as the optuna backend's workers.
    """

    _budget: Budget | None = None  # a searcher pickled by an earlier version, restored, has none

    def __init__(self, *, run: str, budget: Budget | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._run, self._budget = run, budget

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._budget is not None and not self._budget.fits_a_trial(
            search_trials(self._ot_study.get_trials(deepcopy=False))
        ):
            return Searcher.FINISHED
        config = super().suggest(trial_id)
        if config is not None:
            trial = self._ot_trials[trial_id]
            trial.set_user_attr(records.RAY_TRIAL_ID, trial_id)
            trial.set_user_attr(records.RAY_RUN, self._run)
            trial.set_user_attr(records.BACKEND, "ray")
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        pass  # StudyRecorder.on_trial_result

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self._completed_trials.add(trial_id)  # StudyRecorder.on_trial_complete / on_trial_error tells
