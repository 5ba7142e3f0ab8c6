"""The optuna backend: workers claim trials of one study until it holds ``n_trials`` finished ones.

Any number of workers (processes here, or on other machines sharing the storage) run the same loop:

``OptunaTrials`` is this backend's part of ``search`` (``driver.run_search`` does the rest): one worker in
this process, or ``search --workers N`` processes (``search.workers``). ``join_study`` is ``llmflow-hpo
worker``: one more worker on a study that exists.

1. Under the study lock: fail trials whose heartbeat stopped (their retry, same parameters, is queued),
   count the trials that hold a slot (finished, running, queued) and, when a slot is free or a retry is
   queued, ``study.ask()`` and draw the trial's parameters: the claim, the trial's creation and its draw
   are one step, so the study ends with exactly ``n_trials`` finished trials whatever the number of
   workers, and no two workers draw the same point (QMC numbers its points in the study). (optuna's
   ``MaxTrialsCallback`` counts after the fact, so parallel workers overshoot it.) A grid study ends when
   its grid is done.
2. Run the trial with a heartbeat thread beside it. A trial that fails for good (diverged, out of
   memory) frees its slot; a killed worker's trial is found stale by another worker after the grace
   period and retried from its checkpoint.
3. SIGINT/SIGTERM: the running trial is told FAIL ("interrupted") and queued again with its parameters,
   so the next ``search`` resumes it; the process then exits 130 or 143.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import TrialFailure, interrupted_reason
from llmflow_hpo.search.budget import Budget
from llmflow_hpo.search.driver import (
    SearchRun,
    SearchSummary,
    checkpoint_root,
    open_features,
    say_on_stderr,
    search_strategy,
    summarize,
)
from llmflow_hpo.search.reporting import fail_lost_trial, fail_on_error, record_failure
from llmflow_hpo.search.signals import Signals
from llmflow_hpo.search.spaces import SearchSpace
from llmflow_hpo.search.strategy import StudyGrid, study_target
from llmflow_hpo.study import records
from llmflow_hpo.study.lock import StudyLock
from llmflow_hpo.study.optuna_private import record_heartbeat, stored_trial, trial_id
from llmflow_hpo.study.storage import finished_trials, open_storage, retry_callback, retry_transient
from llmflow_hpo.study.view import search_trials
from llmflow_hpo.views.progress import as_progress
from llmflow_hpo.views.tracking import Tracking

__all__ = ["OptunaTrials", "join_study", "run_worker", "work_on_study"]

Log = Callable[[str], None]
Objective = Callable[[optuna.Trial], float]


class _Heartbeat:
    """Records the trial's heartbeat in the storage every ``interval`` seconds while the trial runs.

    The first beat is written before the trial starts, so a worker killed at any point of the trial
    leaves a heartbeat that goes stale. (optuna's own heartbeat thread is private to Study.optimize.)
    """

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: int) -> None:
        self.study, self.trial, self.interval = study, trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id(trial)}", daemon=True)

    def _beat(self) -> None:
        retry_transient(lambda: record_heartbeat(self.study, self.trial))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next interval
                self._beat()

    def __enter__(self) -> _Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _fail_orphans(study: optuna.Study, heartbeat_interval: int) -> None:
    """Fail RUNNING trials that never got their parameters: their worker died before the first heartbeat.

    optuna's stale-trial check only sees trials with a heartbeat; a worker killed in the milliseconds
    between creating its trial and the first beat leaves one it cannot see, holding a slot forever.
    Our objective suggests its parameters first thing, so a trial without any after three heartbeat
    intervals and a minute (clock skew between machines) is dead. It had no parameters: nothing to retry.
    """
    limit = datetime.datetime.now() - datetime.timedelta(seconds=3 * heartbeat_interval + 60)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not t.params and t.datetime_start is not None and t.datetime_start < limit:
            fail_lost_trial(study, t, "its worker died before it started")


def _failed_for_good(trials: list[FrozenTrial]) -> int:
    return sum(1 for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(records.FAILED_FOR_GOOD))


Action = Literal["stop", "claim", "wait"]


def _next_action(
    study: optuna.Study,
    *,
    target: int | None,
    grid: StudyGrid | None,
    max_failures: int | None,
    failed_at_start: int,
    heartbeat_interval: int | None,
    say: Log,
    budget: Budget | None = None,
) -> tuple[Action, int]:
    """Under the study lock: fail the trials whose worker died, then decide what this worker does next, with
    the number of trials running. ``stop``: the study is done (its target, its grid), too many trials failed
    during this run or the budget no longer fits a trial (said why); ``claim``: a slot is free or a retry is
    queued; ``wait``: running trials elsewhere hold the last slots."""
    if heartbeat_interval is not None:
        _fail_orphans(study, heartbeat_interval)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry_transient(lambda: optuna.storages.fail_stale_trials(study))
    trials = search_trials(retry_transient(lambda: study.get_trials(deepcopy=False)))  # confirmations hold no slot
    states = [t.state for t in trials]
    finished = sum(1 for s in states if s in (TrialState.COMPLETE, TrialState.PRUNED))
    running, queued = states.count(TrialState.RUNNING), states.count(TrialState.WAITING)
    if grid is not None and not queued and retry_transient(lambda: grid.is_exhausted(study)):
        say(f"{grid.done_line(study.study_name)}; no new trial started")
        return "stop", running
    if target is not None and finished >= target:
        return "stop", running
    if budget is not None and not budget.fits_a_trial(trials):  # the trials read above, under the same lock
        say(f"study {study.study_name}: the budget of {budget.seconds:g}s is spent; no new trial started")
        return "stop", running
    failed = _failed_for_good(trials) - failed_at_start
    if max_failures is not None and failed > max_failures:
        say(
            f"study {study.study_name}: stopping, {failed} trial(s) failed during this run; "
            "see their fail_reason with `llmflow-hpo trials`"
        )
        return "stop", running
    slot = target is None or finished + running < target
    point = grid is None or grid.points_left(trials) > 0  # the trials read above, under the same lock
    return ("claim" if queued or (slot and point) else "wait"), running


def _ask(study: optuna.Study, heartbeat_interval: int | None) -> optuna.Trial:
    """A new trial (or the oldest queued retry), its first heartbeat written at once."""
    with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize"
        warnings.simplefilter("ignore")
        trial = retry_transient(study.ask)
    if heartbeat_interval is not None:
        retry_transient(lambda: record_heartbeat(study, trial))
    return trial


def _draw(
    study: optuna.Study,
    trial: optuna.Trial,
    draw: Callable[[optuna.Trial], object] | None,
    heartbeat_interval: int | None,
) -> None:
    """Suggest the claimed trial's parameters (still under the lock)."""
    if draw is None:
        return
    draw(trial)
    if heartbeat_interval is not None:  # a slow draw (GP) must not look like a dead worker
        retry_transient(lambda: record_heartbeat(study, trial))


def _timed_out(study: optuna.Study, timeout: float | None, start: float, say: Log) -> bool:
    """Whether the timeout is reached (said so): no new trial starts. (The budget is ``_next_action``'s.)"""
    if timeout is not None and time.monotonic() - start >= timeout:
        say(f"study {study.study_name}: timeout of {timeout:g}s reached; no new trial started")
        return True
    return False


def run_worker(
    study: optuna.Study,
    objective: Objective,
    *,
    target: int | None,
    timeout: float | None = None,
    lock: StudyLock | None = None,
    retry: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    heartbeat_interval: int | None = None,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
    after_trial: Callable[[optuna.Study], None] | None = None,
    draw: Callable[[optuna.Trial], object] | None = None,
    poll_seconds: float = 2.0,
    log: Log | None = None,
    budget: Budget | None = None,
) -> int:
    """Claim and run trials of ``study`` until it holds ``target`` finished trials; returns how many ran here.

    ``objective`` returns the trial's value, or raises ``optuna.TrialPruned`` or ``TrialFailure`` (the
    trial fails for good and frees its slot). ``draw`` suggests the trial's parameters under the lock,
    right after the claim (the objective then gets the same values back). ``after_trial`` runs under the
    lock after each trial (the checkpoint cleanup). Ctrl-C / SIGTERM: the running trial is told FAIL,
    queued again through ``retry`` and ``Interrupted`` (a KeyboardInterrupt) is raised. A study sampled by
    the grid (``strategy.StudyGrid``) ends when its grid is done, whatever ``target`` says. ``budget``:
    no trial starts once it is spent, or when half a typical trial no longer fits (``search.budget``).
    """
    say = log or say_on_stderr
    lock = lock or StudyLock("", study.study_name)  # no storage URL: an unlocked no-op
    grid = study.sampler if isinstance(study.sampler, StudyGrid) else None
    start = time.monotonic()
    trials = search_trials(retry_transient(lambda: study.get_trials(deepcopy=False)))  # confirmations hold no slot
    failed_at_start = _failed_for_good(trials)
    finished_at_start = sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    # As many failures as trials still missing are tolerated (the same budget again); one more stops the run.
    max_failures = None if target is None else max(target - finished_at_start, 1)
    ran = 0
    waiting_said = False
    while True:
        if _timed_out(study, timeout, start, say):
            break
        trial = None
        try:
            with Signals.critical(), lock.held():
                action, running = _next_action(
                    study,
                    target=target,
                    grid=grid,
                    max_failures=max_failures,
                    failed_at_start=failed_at_start,
                    heartbeat_interval=heartbeat_interval,
                    say=say,
                    budget=budget,
                )
                if action == "claim":
                    trial = _ask(study, heartbeat_interval)
                    _draw(study, trial, draw, heartbeat_interval)
        except KeyboardInterrupt as e:  # a signal held back during the claim: the trial is recorded first
            if trial is not None:
                _record_interruption(study, trial, e, lock=lock, retry=retry)
            raise
        if action == "stop":
            break
        if trial is None:
            # Every remaining slot is held by a running trial: wait, in case one fails or its worker dies.
            if not waiting_said:
                say(
                    f"study {study.study_name}: {running} trial(s) still running elsewhere hold the last slots; waiting"
                )
                waiting_said = True
            time.sleep(poll_seconds)
            continue
        waiting_said = False
        frozen = _run_trial(study, trial, objective, lock=lock, retry=retry, heartbeat_interval=heartbeat_interval)
        ran += 1
        if after_trial is not None:
            with lock.held():
                after_trial(study)
        for callback in callbacks or []:
            callback(study, frozen)
    return ran


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    objective: Objective,
    *,
    lock: StudyLock,
    retry: Callable[[optuna.Study, FrozenTrial], None] | None,
    heartbeat_interval: int | None,
) -> FrozenTrial:
    """Run one claimed trial and tell its outcome; returns the trial as stored."""
    beat = _Heartbeat(study, trial, heartbeat_interval) if heartbeat_interval is not None else contextlib.nullcontext()
    value: float | None = None
    state = TrialState.COMPLETE
    try:
        with beat:
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except TrialFailure:
                state = TrialState.FAIL
    except KeyboardInterrupt as e:
        _record_interruption(study, trial, e, lock=lock, retry=retry)
        raise
    except BaseException as e:
        fail_on_error(study, trial, e)
        raise
    with Signals.critical():
        told = retry_transient(
            lambda: study.tell(
                trial, value if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True
            )
        )
    if told.state != state:
        print(
            f"trial {trial.number}: another worker marked it {told.state.name} (its heartbeat was missed); "
            "the result of this attempt is dropped, its retry continues it",
            file=sys.stderr,
        )
    return told


def _record_interruption(
    study: optuna.Study,
    trial: optuna.Trial,
    error: KeyboardInterrupt,
    *,
    lock: StudyLock,
    retry: Callable[[optuna.Study, FrozenTrial], None] | None,
) -> None:
    """FAIL the trial with the reason, and queue it again (same parameters) for the next run to resume.

    A trial another worker already failed as stale (its heartbeat was missed) had its retry queued then:
    it is left as it is, so that one configuration is not queued twice.
    """
    with Signals.critical(), lock.held():
        if retry_transient(lambda: stored_trial(study, trial)).state.is_finished():
            return
        retry_transient(lambda: record_failure(trial, interrupted_reason(error), for_good=False))
        told = retry_transient(lambda: study.tell(trial, state=TrialState.FAIL, skip_if_finished=True))
        if retry is not None and told.state == TrialState.FAIL:
            retry(study, told)


def work_on_study(
    cfg: StudyConfig,
    space: Any,
    features: Any,
    study: optuna.Study,
    *,
    log: Log,
    tracking: Tracking | None = None,
    budget: Budget | None = None,
) -> int:
    """This process's share of the study: the real objective, checkpoints, heartbeat, lock, signals.

    ``log`` may be the search's ``Progress`` (live display); ``tracking``: the caller's trackers, else
    this process opens (and closes) its own.
    """
    from llmflow_hpo.recipe.checkpoints import CheckpointStore
    from llmflow_hpo.search.objective import Objective as TrialObjective
    from llmflow_hpo.search.spaces import suggest_params
    from llmflow_hpo.views.tracking import open_tracking

    target = study_target(cfg, space)
    progress = as_progress(log)
    progress.start(study=study, target=target, metric=cfg.metric, direction=cfg.direction)
    own_tracking = tracking is None
    if tracking is None:
        tracking = open_tracking(cfg, study, log=progress.warn)

    checkpoints = None
    if cfg.checkpoint.enabled:
        checkpoints = CheckpointStore(
            checkpoint_root(cfg),
            every_evals=cfg.checkpoint.every_evals,
            max_overhead=cfg.checkpoint.max_overhead,
            keep_best=cfg.checkpoint.keep_best,
        )

    def cleanup(study: optuna.Study) -> None:
        if checkpoints is not None:
            checkpoints.cleanup(study.get_trials(deepcopy=False), cfg.direction)

    assert cfg.storage is not None
    lock = StudyLock(cfg.storage, cfg.study_name)
    try:
        with Signals.installed():
            ran = run_worker(
                study,
                TrialObjective(
                    cfg, space, features, checkpoints, log=progress, progress=progress, tracking=tracking, budget=budget
                ),
                target=target,
                timeout=cfg.timeout,
                lock=lock,
                retry=retry_callback(cfg.heartbeat),
                heartbeat_interval=cfg.heartbeat.interval,
                callbacks=[progress.trial_finished, lambda _study, trial: tracking.trial_finished(trial)],
                after_trial=cleanup,
                draw=lambda trial: suggest_params(trial, space),
                poll_seconds=min(2.0, cfg.heartbeat.interval),
                log=progress,
                budget=budget,
            )
            with lock.held():
                cleanup(study)
    finally:
        lock.close()
        progress.close()
        if own_tracking:
            tracking.close()
    return ran


def join_study(cfg: StudyConfig, space: SearchSpace, *, log: Log | None = None) -> SearchSummary:
    """``llmflow-hpo worker``: join an existing study with its stored config and run trials until it is done.

    The caller has loaded the study already (its config comes from there), so the study exists.
    """
    say = log or say_on_stderr
    assert cfg.storage is not None
    features = open_features(cfg, say)
    sampler, pruner = search_strategy(cfg, space, len(features.splits["train"]))
    study = optuna.load_study(
        study_name=cfg.study_name, storage=open_storage(cfg.storage, cfg.heartbeat), sampler=sampler, pruner=pruner
    )
    done = finished_trials(study)
    budget = Budget.joined(cfg.budget_s) if cfg.budget_s is not None else None  # the search's end, if spawned
    ran = work_on_study(cfg, space, features, study, log=say, budget=budget)
    return summarize(study, cfg, finished_trials(study) - done if ran else 0, 1, study_target(cfg, space))


class OptunaTrials:
    """The optuna backend's part of ``driver.run_search``: one worker in this process, or ``workers`` worker
    processes (``search --workers N``), each running ``run_worker`` on the study."""

    heartbeat = True  # a killed worker's trial is found by its stale heartbeat and retried

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def check(self, cfg: StudyConfig, space: SearchSpace, n_train: int, source: str) -> None:
        pass  # validate's checks are all the optuna backend needs

    def unfinished(self, cfg: StudyConfig, study: optuna.Study) -> bool:
        return False  # an interrupted trial was queued again: it counts as a missing trial

    def announce(self, cfg: StudyConfig, remaining: int | None) -> str | None:
        what = f"{remaining if remaining is not None else 'unbounded'} trial(s)"
        if cfg.budget is not None:
            what = f"{'up to ' + what if remaining is not None else 'trials'} within the budget of {cfg.budget}"
        return (
            f"study {cfg.study_name}: running {what} "
            f"in {self.workers} worker(s) ({cfg.sampler.name} sampler, {cfg.pruner.name} pruner, "
            f"dev {cfg.metric} {cfg.direction}), storage {cfg.storage}"
        )

    def run(self, run: SearchRun) -> None:
        if self.workers == 1:
            work_on_study(
                run.cfg, run.space, run.features, run.study, log=run.progress, tracking=run.tracking, budget=run.budget
            )
            return
        from llmflow_hpo.search.workers import run_worker_processes

        run.progress.workers = self.workers
        run_worker_processes(run.cfg, self.workers, log=run.progress, budget=run.budget)
