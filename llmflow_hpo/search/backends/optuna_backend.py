"""The optuna backend: workers claim trials of one study until it holds ``n_trials`` finished ones.

Any number of workers (processes here, or on other machines sharing the storage) run the same loop:

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
import functools
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import Interrupted, TrialFailure
from llmflow_hpo.search.strategy import StudyGrid, study_target
from llmflow_hpo.study.storage import (
    StudyLock,
    finished_trials,
    open_storage,
    open_study,
    retry_callback,
    retry_transient,
)
from llmflow_hpo.views.progress import as_progress
from llmflow_hpo.views.tracking import Tracking

__all__ = ["SearchSummary", "run_search", "run_worker", "work_on_study"]

Log = Callable[[str], None]
Objective = Callable[[optuna.Trial], float]


@dataclass
class SearchSummary:
    study_name: str
    storage: str
    ran: int
    counts: dict[str, int]
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    workers: int = 1
    checkpoint_bytes: int = 0
    retried: int = 0  # failed trials (killed, interrupted) that a later trial repeated
    target: int | None = None  # finished trials the study aims at: n_trials, at most the grid's size


def _counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state.name.lower(): sum(1 for t in trials if t.state == state) for state in TrialState}


def _best(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


class _Heartbeat:
    """Records the trial's heartbeat in the storage every ``interval`` seconds while the trial runs.

    The first beat is written before the trial starts, so a worker killed at any point of the trial
    leaves a heartbeat that goes stale. (optuna's own heartbeat thread is private to Study.optimize.)
    """

    def __init__(self, storage: Any, trial_id: int, interval: int) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next interval
                retry_transient(lambda: self.storage.record_heartbeat(self.trial_id))

    def __enter__(self) -> _Heartbeat:
        retry_transient(lambda: self.storage.record_heartbeat(self.trial_id))
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class _Signals:
    """SIGINT and SIGTERM raise ``Interrupted`` once; repeats are ignored.

    Inside ``critical()`` (claiming a trial, telling its result) a signal waits until the section ends:
    a trial created but never given its heartbeat would hold its slot with nothing to detect it.
    """

    depth = 0
    pending: int | None = None
    fired = False

    @classmethod
    def _handler(cls, signum: int, _frame: Any) -> None:
        if cls.fired:
            return
        if cls.depth:
            cls.pending = cls.pending or signum
            return
        cls.fired = True
        raise Interrupted(signum)

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        cls.depth, cls.pending, cls.fired = 0, None, False
        previous = {s: signal.signal(s, cls._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    @classmethod
    @contextlib.contextmanager
    def critical(cls) -> Iterator[None]:
        cls.depth += 1
        try:
            yield
        finally:
            cls.depth -= 1
        if cls.depth == 0 and cls.pending is not None and not cls.fired:
            signum, cls.pending, cls.fired = cls.pending, None, True
            raise Interrupted(signum)


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
            with contextlib.suppress(Exception):  # another worker failed it first
                study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "its worker died before it started")
                study.tell(t.number, state=TrialState.FAIL)


def _queued(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _failed_for_good(trials: list[FrozenTrial]) -> int:
    return sum(1 for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("failed_for_good"))


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
) -> int:
    """Claim and run trials of ``study`` until it holds ``target`` finished trials; returns how many ran here.

    ``objective`` returns the trial's value, or raises ``optuna.TrialPruned`` or ``TrialFailure`` (the
    trial fails for good and frees its slot). ``draw`` suggests the trial's parameters under the lock,
    right after the claim (the objective then gets the same values back). ``after_trial`` runs under the
    lock after each trial (the checkpoint cleanup). Ctrl-C / SIGTERM: the running trial is told FAIL,
    queued again through ``retry`` and ``Interrupted`` (a KeyboardInterrupt) is raised. A study sampled by
    the grid (``strategy.StudyGrid``) ends when its grid is done, whatever ``target`` says.
    """
    say = log or (lambda line: print(line, file=sys.stderr))
    lock = lock or StudyLock("", study.study_name)  # no storage URL: an unlocked no-op
    storage = study._storage  # optuna exposes no public handle for record_heartbeat / fail_stale_trials
    grid = study.sampler if isinstance(study.sampler, StudyGrid) else None
    start = time.monotonic()
    trials = retry_transient(lambda: study.get_trials(deepcopy=False))
    failed_at_start = _failed_for_good(trials)
    finished_at_start = sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    # As many failures as trials still missing are tolerated (the same budget again); one more stops the run.
    max_failures = None if target is None else max(target - finished_at_start, 1)
    ran = 0
    waiting_said = False
    while True:
        if timeout is not None and time.monotonic() - start >= timeout:
            say(f"study {study.study_name}: timeout of {timeout:g}s reached; no new trial started")
            break
        trial = None
        try:
            with _Signals.critical(), lock.held():
                if heartbeat_interval is not None:
                    _fail_orphans(study, heartbeat_interval)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        retry_transient(lambda: optuna.storages.fail_stale_trials(study))
                trials = retry_transient(lambda: study.get_trials(deepcopy=False))
                states = [t.state for t in trials]
                finished = sum(1 for s in states if s in (TrialState.COMPLETE, TrialState.PRUNED))
                running, queued = states.count(TrialState.RUNNING), states.count(TrialState.WAITING)
                if grid is not None and not queued and retry_transient(lambda: grid.is_exhausted(study)):
                    say(f"{grid.done_line(study.study_name)}; no new trial started")
                    break
                if target is not None and finished >= target:
                    break
                failed = _failed_for_good(trials) - failed_at_start
                if max_failures is not None and failed > max_failures:
                    say(
                        f"study {study.study_name}: stopping, {failed} trial(s) failed during this run; "
                        "see their fail_reason with `llmflow-hpo trials`"
                    )
                    break
                slot = target is None or finished + running < target
                point = grid is None or retry_transient(lambda: grid.points_left(study)) > 0
                if queued or (slot and point):
                    with warnings.catch_warnings():  # "heartbeat is supposed to be used with Study.optimize"
                        warnings.simplefilter("ignore")
                        trial = retry_transient(study.ask)
                    if heartbeat_interval is not None:
                        retry_transient(functools.partial(storage.record_heartbeat, trial._trial_id))
                    if draw is not None:
                        draw(trial)
                        if heartbeat_interval is not None:  # a slow draw (GP) must not look like a dead worker
                            retry_transient(functools.partial(storage.record_heartbeat, trial._trial_id))
        except KeyboardInterrupt as e:  # a signal held back during the claim: the trial is recorded first
            if trial is not None:
                _record_interruption(study, trial, e, lock=lock, retry=retry)
            raise
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
    beat = (
        _Heartbeat(study._storage, trial._trial_id, heartbeat_interval)
        if heartbeat_interval is not None
        else contextlib.nullcontext()
    )
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
        with contextlib.suppress(Exception):
            trial.set_user_attr("fail_reason", f"error: {type(e).__name__}: {e}")
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    with _Signals.critical():
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
    how = signal.Signals(error.signum).name if isinstance(error, Interrupted) else "SIGINT"
    with _Signals.critical(), lock.held():
        if retry_transient(lambda: study._storage.get_trial(trial._trial_id)).state.is_finished():
            return
        retry_transient(lambda: trial.set_user_attr("fail_reason", f"interrupted ({how})"))
        told = retry_transient(lambda: study.tell(trial, state=TrialState.FAIL, skip_if_finished=True))
        if retry is not None and told.state == TrialState.FAIL:
            retry(study, told)


def checkpoint_root(cfg: StudyConfig) -> Path:
    """The study's checkpoint folder; a config without ``checkpoint.dir`` (a study stored by an older
    version) uses ``checkpoints/`` beside its SQLite file, or in the working directory."""
    if cfg.checkpoint.dir is not None:
        return Path(cfg.checkpoint.dir) / cfg.study_name
    url = str(cfg.storage)
    base = Path(url[len("sqlite:///") :]).parent if url.startswith("sqlite:///") else Path.cwd()
    return base / "checkpoints" / cfg.study_name


def work_on_study(
    cfg: StudyConfig,
    space: Any,
    features: Any,
    study: optuna.Study,
    *,
    log: Log,
    poll_seconds: float | None = None,
    tracking: Tracking | None = None,
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
        with _Signals.installed():
            ran = run_worker(
                study,
                TrialObjective(cfg, space, features, checkpoints, log=progress, progress=progress, tracking=tracking),
                target=target,
                timeout=cfg.timeout,
                lock=lock,
                retry=retry_callback(cfg.heartbeat),
                heartbeat_interval=cfg.heartbeat.interval,
                callbacks=[progress.trial_finished, lambda _study, trial: tracking.trial_finished(trial)],
                after_trial=cleanup,
                draw=lambda trial: suggest_params(trial, space),
                poll_seconds=poll_seconds if poll_seconds is not None else min(2.0, cfg.heartbeat.interval),
                log=progress,
            )
            with lock.held():
                cleanup(study)
    finally:
        lock.close()
        progress.close()
        if own_tracking:
            tracking.close()
    return ran


def summarize(
    study: optuna.Study, cfg: StudyConfig, ran: int, workers: int, target: int | None = None
) -> SearchSummary:
    from llmflow_hpo.recipe.checkpoints import folder_size

    best = _best(study)
    size = folder_size(checkpoint_root(cfg))
    return SearchSummary(
        study_name=cfg.study_name,
        storage=str(cfg.storage),
        ran=ran,
        counts=_counts(study),
        best_number=best.number if best else None,
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        workers=workers,
        checkpoint_bytes=size,
        retried=len({t.user_attrs["retry_of"] for t in study.get_trials(deepcopy=False) if "retry_of" in t.user_attrs}),
        target=cfg.n_trials if target is None else target,
    )


def run_search(
    cfg: StudyConfig,
    space: Any,
    space_raw: dict[str, Any],
    *,
    workers: int = 1,
    new_study: bool = False,
    log: Log | None = None,
    data: Any = None,
) -> SearchSummary:
    """Tokenize once (``data``: the splits already read), open (or continue) the study, and run the missing
    trials in ``workers`` processes."""
    from llmflow_hpo.data.features import prepare_features
    from llmflow_hpo.search.strategy import build_pruner, build_sampler
    from llmflow_hpo.study.storage import free_study_name
    from llmflow_hpo.views.tracking import search_tracking

    say = log or (lambda line: print(line, file=sys.stderr))
    # Our progress lines report each trial (fail reasons included); optuna would repeat them with tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    features = prepare_features(cfg, log=say, data=data)
    assert cfg.storage is not None
    if new_study:
        cfg.study_name = free_study_name(cfg.storage, cfg.study_name)
        say(f"study {cfg.study_name}: a new study, as --new-study asked")
    sampler, pruner = build_sampler(cfg, space), build_pruner(cfg, len(features.splits["train"]), space)
    study = open_study(
        cfg, space_raw, sampler=sampler, pruner=pruner, data_report=features.report, heartbeat=cfg.heartbeat
    )
    done = finished_trials(study)
    target = study_target(cfg, space)
    remaining = None if target is None else max(target - done, 0)
    if done:
        say(f"study {cfg.study_name}: continuing, {done} finished trial(s) already stored")
    if target is not None and target != cfg.n_trials:
        say(f"study {cfg.study_name}: the grid has {target} point(s); the study ends when each has run")
    if isinstance(sampler, StudyGrid) and not _queued(study) and sampler.is_exhausted(study):
        say(f"{sampler.done_line(cfg.study_name)}; nothing to run")
        return summarize(study, cfg, 0, workers, target)
    if remaining == 0:
        say(f"study {cfg.study_name}: already holds {done} finished trials (n_trials={cfg.n_trials}); nothing to run")
        return summarize(study, cfg, 0, workers, target)
    say(
        f"study {cfg.study_name}: running {remaining if remaining is not None else 'unbounded'} trial(s) "
        f"in {workers} worker(s) ({cfg.sampler.name} sampler, {cfg.pruner.name} pruner, "
        f"dev {cfg.metric} {cfg.direction}), storage {cfg.storage}"
    )
    start = time.perf_counter()
    progress = as_progress(say)
    # The study's trackers (and its MLflow run) are opened here, before any worker starts.
    with search_tracking(cfg, study, log=progress.warn) as tracking:
        if workers == 1:
            work_on_study(cfg, space, features, study, log=progress, tracking=tracking)
        else:
            from llmflow_hpo.search.workers import run_worker_processes

            progress.workers = workers
            run_worker_processes(cfg, workers, log=progress)
    say(f"study {cfg.study_name}: search took {time.perf_counter() - start:.1f}s")
    return summarize(study, cfg, finished_trials(study) - done, workers, target)


def join_study(cfg: StudyConfig, space: Any, *, log: Log | None = None) -> SearchSummary:
    """``llmflow-hpo worker``: join an existing study with its stored config and run trials until it is done.

    The caller has loaded the study already (its config comes from there), so the study exists.
    """
    from llmflow_hpo.data.features import prepare_features
    from llmflow_hpo.search.strategy import build_pruner, build_sampler

    say = log or (lambda line: print(line, file=sys.stderr))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    assert cfg.storage is not None
    features = prepare_features(cfg, log=say)
    study = optuna.load_study(
        study_name=cfg.study_name,
        storage=open_storage(cfg.storage, cfg.heartbeat),
        sampler=build_sampler(cfg, space),
        pruner=build_pruner(cfg, len(features.splits["train"]), space),
    )
    done = finished_trials(study)
    ran = work_on_study(cfg, space, features, study, log=say)
    return summarize(study, cfg, finished_trials(study) - done if ran else 0, 1, study_target(cfg, space))
