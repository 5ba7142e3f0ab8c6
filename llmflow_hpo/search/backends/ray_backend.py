"""The Ray Tune backend: the same study, its trials run by Ray Tune on a local Ray or a cluster.

What comes from where:

- Parameters: Ray's ``OptunaSearch`` asks the study's own sampler (the configured one, seeded per trial)
  over the study's optuna distributions, in the study itself: the trials it asks are the study's trials.
  PBT cannot run with a search algorithm (Ray refuses it), so its population is drawn at random by Ray
  from the same distributions, and each Ray trial becomes a study trial when it starts.
- Stopping: a Ray scheduler (ASHA, HyperBand, median stopping, PBT) instead of the optuna pruner. Its time
  unit is training examples seen, the step every evaluation is reported at in both backends (HyperBand:
  evaluations, see ``build_scheduler``).
- Recording: ``StudyRecorder``, a Ray Tune callback in the driver, writes every evaluation as the trial's
  intermediate value at its step, and the end of every trial: COMPLETE with the best dev metric, PRUNED
  when the scheduler stopped it, FAIL with the reason when it failed more than ``ray.max_failures`` times.
  Only the driver needs the storage; Ray's workers never open it.
- Resume: Ray's experiment state lives in ``ray.dir/<study>-run<K>``. A ``search`` that finds the last run
  interrupted (study trials of that run still RUNNING) restores it with ``Tuner.restore``: running trials
  continue from their last checkpoint. Otherwise it starts run K+1 for the trials still missing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import ConfigError, TrialFailure
from llmflow_hpo.recipe.checkpoints import RESUME, TrialCheckpoint
from llmflow_hpo.search.reporting import improves, store_best, store_result
from llmflow_hpo.search.spaces import SearchSpace
from llmflow_hpo.search.strategy import first_evaluation_step, longest_epochs, study_target
from llmflow_hpo.views.progress import Progress, as_progress
from llmflow_hpo.views.tracking import Tracking

__all__ = ["StudyRecorder", "StudySearch", "ray_trial", "run_search"]

Log = Callable[[str], None]
# The progress display and trackers of the searches this driver runs, by study name: the StudyRecorder
# (a Ray callback in this process, pickled with the run's state and restored from it) finds them here.
DRIVER: dict[str, tuple[Progress, Tracking]] = {}

STEP = "step"  # the result key the schedulers count time in: training examples seen
EVALUATION = "evaluation"  # the evaluation point's number (1, 2, ...): HyperBand's time, see build_scheduler
# Hyperparameters PBT may change in a running trial: they do not change the model's shape, the optimizer's
# kind or the length of the run.
PBT_MUTABLE = (
    "learning_rate",
    "weight_decay",
    "warmup_ratio",
    "hidden_dropout",
    "attention_dropout",
    "label_smoothing",
    "max_grad_norm",
    "momentum",
    "focal_gamma",
)
_SCHEDULERS = {
    "asha": "ASHAScheduler",
    "hyperband": "HyperBandScheduler",
    "median": "MedianStoppingRule",
    "pbt": "PopulationBasedTraining",
}
_RESERVED = {"time_attr", "metric", "mode", "hyperparam_mutations"}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def metric_key(cfg: StudyConfig) -> str:
    return f"dev_{cfg.metric}"


# ----------------------------------------------------------------------------------------------------
# Inside a Ray worker: one trial.


class _AttrSink:
    """Collects what ``reporting.store_result`` would set on an optuna trial, to send it with a report."""

    def __init__(self) -> None:
        self.attrs: dict[str, Any] = {}

    def set_user_attr(self, key: str, value: Any) -> None:
        self.attrs[key] = value


class _RayReporter:
    """The training loop's ``on_eval`` under Ray: each evaluation goes to ``tune.report`` with the step,
    the best value so far and its metrics, and the checkpoint when the loop has just written one."""

    def __init__(self, cfg: StudyConfig, checkpoint: Any, n_train: int) -> None:
        self.metric, self.direction, self.key = cfg.metric, cfg.direction, metric_key(cfg)
        self.points_per_example = cfg.train.evals_per_epoch / n_train
        self.checkpoint = checkpoint
        self.best: Any = None
        self.extra: dict[str, Any] = {"worker": f"{socket.gethostname()}:{os.getpid()}", "seed": cfg.seed}
        self._written = 0

    def _better(self, value: float) -> bool:
        return improves(value, self.best, self.metric, self.direction)

    def restore(self, history: list[Any]) -> None:
        for evaluation in history:
            if self._better(evaluation.metrics[self.metric]):
                self.best = evaluation
        if history:
            self.extra["resumed_at_step"] = history[-1].step
            self.extra["resumed_at_optimizer_step"] = history[-1].optimizer_step
        if self.checkpoint is not None:
            self._written = self.checkpoint.written

    def _attrs(self) -> dict[str, Any]:
        sink = _AttrSink()
        store_best(sink, self.best)
        return {**sink.attrs, **self.extra}

    def __call__(self, evaluation: Any) -> None:
        value = evaluation.metrics[self.metric]
        if not math.isfinite(value):
            raise TrialFailure(f"dev {self.metric} is {value} at step {evaluation.step}")
        if self._better(value):
            self.best = evaluation
        checkpoint = None
        if self.checkpoint is not None and self.checkpoint.written > self._written:
            self._written = self.checkpoint.written
            checkpoint = tune.Checkpoint.from_directory(str(self.checkpoint.folder))
        tune.report(
            {
                self.key: value,
                STEP: evaluation.step,
                EVALUATION: round(evaluation.step * self.points_per_example),
                "best_value": self.best.metrics[self.metric],
                "train_loss": evaluation.train_loss,
                "metrics": dict(evaluation.metrics),  # every dev metric, for the trackers
                "final": evaluation.last,  # a scheduler stopping the trial now stops a finished run
                "attrs": self._attrs(),
            },
            checkpoint=checkpoint,
        )
        if checkpoint is not None:  # Ray has copied it to ray.dir: no second copy on the worker's disk
            (self.checkpoint.folder / RESUME).unlink(missing_ok=True)

    def final(self, result: Any, seed: int) -> None:
        """The run ended by itself (all epochs, or early stopping): the run's costs, at the last step again."""
        sink = _AttrSink()
        store_result(sink, result, seed)
        last = result.history[-1]
        tune.report(
            {
                self.key: last.metrics[self.metric],
                STEP: last.step,
                EVALUATION: round(last.step * self.points_per_example),
                "best_value": result.best.metrics[self.metric],
                "train_loss": last.train_loss,
                "final": True,
                "attrs": {**sink.attrs, **self.extra},
            }
        )


class RayTrialCheckpoint(TrialCheckpoint):
    """Only the resume state, handed to Ray with the next report; Ray keeps the trial's checkpoints.

    The best model weights are not written: the optuna backend keeps them for ``checkpoint.keep_best``,
    Ray trials leave the model to ``retrain-best``.
    """

    def remember_best(self, model: Any) -> None:
        pass

    def finish(self) -> None:
        pass


def ray_trial(config: dict[str, Any], *, cfg: StudyConfig, space: SearchSpace, features: Any, every_eval: bool) -> None:
    """The Ray Tune trainable: train one configuration, reporting every dev evaluation to Ray.

    ``every_eval``: checkpoint after every evaluation (PBT clones them, HyperBand pauses on them);
    otherwise the study's checkpoint policy (at most ``checkpoint.max_overhead`` of the trial's time).
    """
    import logging

    from llmflow_hpo.recipe.train import runtime_attrs, train_and_evaluate

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # "Checkpoint successfully created" per report
    params = {name: config[name] for name in space}
    cfg = copy.deepcopy(cfg)
    if cfg.train.num_threads is None:
        cfg.train.num_threads = max(1, int(cfg.ray.cpus_per_trial))
    # One staging folder per actor process, emptied when a trial starts: a trial the scheduler stops does
    # not unwind (its thread is dropped), so what it left is removed by the actor's next trial.
    folder = Path(tempfile.gettempdir()) / f"llmflow-ray-trial-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        checkpoint = None
        if cfg.checkpoint.enabled:
            restored = tune.get_checkpoint()
            if restored is not None:
                restored.to_directory(str(folder))
            checkpoint = RayTrialCheckpoint(
                folder,
                params,
                every_evals=1 if every_eval else cfg.checkpoint.every_evals,
                max_overhead=1.0 if every_eval else cfg.checkpoint.max_overhead,
                accept_other_params=cfg.ray.scheduler == "pbt",
            )
        reporter = _RayReporter(cfg, checkpoint, len(features.splits["train"]))
        reporter.extra.update(runtime_attrs(cfg, params))
        result = train_and_evaluate(
            cfg, params, features, seed=cfg.seed, on_eval=reporter, checkpoint=checkpoint, on_resume=reporter.restore
        )
        if result.best is None:
            raise TrialFailure("the run ended before its first evaluation")
        reporter.final(result, cfg.seed)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# In the driver: the study's trials, written as Ray reports them.


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
        """The search's progress display (run_search registers it), else lines on stderr."""
        if self._progress is None:
            driver = DRIVER.get(self.study_name)
            self._progress = driver[0] if driver else as_progress(_stderr)
            self._progress.start(study=self.study, target=self.target, metric=self.metric, direction=self.direction)
        return self._progress

    @property
    def tracking(self) -> Tracking | None:
        """The driver's trackers (run_search registers them; a restored recorder finds them the same way)."""
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
            if t.user_attrs.get("ray_trial_id") == tid and t.user_attrs.get("ray_run") == self.run:
                self._numbers[tid], self._ids[tid] = t.number, t._trial_id
                self._last_step[tid] = max(t.intermediate_values, default=-1)
                return t.number
        # Created RUNNING with its parameters, not enqueued and asked: ``ask`` takes the oldest WAITING
        # trial, which may be another one (a retry the optuna backend queued).
        params = {name: trial.config[name] for name in self.space}
        frozen = optuna.trial.create_trial(
            state=TrialState.RUNNING,
            params=params,
            distributions=dict(self.space),
            user_attrs={"ray_trial_id": tid, "ray_run": self.run, "backend": "ray"},
        )
        storage = self.study._storage  # study.add_trial returns no trial id
        trial_id = storage.create_new_trial(self.study._study_id, template_trial=frozen)
        self._numbers[tid], self._ids[tid] = storage.get_trial_number_from_id(trial_id), trial_id
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
        worker = (result.get("attrs") or {}).get("worker")
        if worker and self._workers.get(trial.trial_id) != worker:  # shown while it runs, as the optuna backend does
            t.set_user_attr("worker", worker)
            self._workers[trial.trial_id] = worker
        params = {name: trial.config.get(name) for name in self.space}
        before = self._params.setdefault(trial.trial_id, params)
        if params != before:  # PBT exploited another trial and mutated: record the new parameters
            schedule = list(t.user_attrs.get("pbt_schedule", []))
            schedule.append({"step": step, "params": params})
            t.set_user_attr("pbt_schedule", schedule)
            self._params[trial.trial_id] = params

    def _finish(self, trial: Any, state: TrialState, value: float | None, attrs: dict[str, Any]) -> None:
        t = self._trial(trial)
        for key, val in attrs.items():
            t.set_user_attr(key, val)
        t.set_user_attr("ray_failures", int(trial.num_failures))
        frozen = self.study.tell(t, value, state=state, skip_if_finished=True)
        self.progress.trial_finished(self.study, frozen)
        if self.tracking is not None:
            self.tracking.trial_finished(frozen)
        if self.scheduler != "pbt":  # PBT may still clone a finished trial's checkpoint
            _drop_checkpoints(trial)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        attrs = dict(last.get("attrs") or {})
        if last.get("final"):
            self._finish(trial, TrialState.COMPLETE, float(last["best_value"]), attrs)
        elif STEP in last:
            attrs.update(pruned_at_step=int(last[STEP]), stopped_by=self.scheduler)
            self._finish(trial, TrialState.PRUNED, None, attrs)
        else:
            attrs["fail_reason"] = "the trial ended without reporting an evaluation"
            self._finish(trial, TrialState.FAIL, None, attrs)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        attrs = dict(last.get("attrs") or {})
        attrs["fail_reason"] = _error_line(trial)
        self._finish(trial, TrialState.FAIL, None, attrs)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        number = self._number(trial)
        self.progress(
            f"trial {number:3d} failed ({_error_line(trial)}); Ray restarts it from its last checkpoint "
            f"(failure {trial.num_failures}, ray.max_failures={trial.max_failures})"
        )


def _drop_checkpoints(trial: Any) -> None:
    """A finished trial's checkpoints in a local ``ray.dir`` (Ray keeps them; nothing resumes them now)."""
    path = trial.path
    if not path or "://" in path or not Path(path).is_dir():
        return
    for folder in Path(path).glob("checkpoint_*"):
        shutil.rmtree(folder, ignore_errors=True)


def _error_line(trial: Any) -> str:
    """The last line of a Ray trial's error (the exception itself), or its type when there is none.

    A ``TrialFailure`` (diverged, a non-finite dev metric, out of memory) gives its reason alone, the
    ``fail_reason`` the optuna backend stores for it.
    """
    text = ""
    with contextlib.suppress(Exception):
        text = str(trial.get_pickled_error() or trial.get_error() or "")
    if not text:
        with contextlib.suppress(Exception):
            text = Path(trial.error_file).read_text()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "error (see Ray's trial log)"
    failure = f"{TrialFailure.__module__}.{TrialFailure.__name__}: "
    return lines[-1][len(failure) :] if lines[-1].startswith(failure) else f"error: {lines[-1]}"


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch on the study itself: it asks the study's sampler, in the study's storage.

    It only asks: ``StudyRecorder`` reports and tells, so a trial's steps are the study's steps (examples
    seen, not Ray's iteration count), its value is its best evaluation (not the last one), and a trial the
    scheduler stopped is PRUNED (OptunaSearch would record it COMPLETE with its last value).
    """

    def __init__(self, *, run: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._run = run

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        if config is not None:
            trial = self._ot_trials[trial_id]
            trial.set_user_attr("ray_trial_id", trial_id)
            trial.set_user_attr("ray_run", self._run)
            trial.set_user_attr("backend", "ray")
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        pass  # StudyRecorder.on_trial_result

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self._completed_trials.add(trial_id)  # StudyRecorder.on_trial_complete / on_trial_error tells


# ----------------------------------------------------------------------------------------------------
# Schedulers and spaces.


def tune_domain(dist: Any) -> Any:
    """An optuna distribution as a Ray Tune domain (for PBT, which samples and mutates by itself)."""
    if isinstance(dist, CategoricalDistribution):
        return tune.choice(list(dist.choices))
    if isinstance(dist, IntDistribution):
        if dist.log:
            return tune.lograndint(dist.low, dist.high + 1)
        return tune.qrandint(dist.low, dist.high, dist.step) if dist.step > 1 else tune.randint(dist.low, dist.high + 1)
    if isinstance(dist, FloatDistribution):
        if dist.step is not None:
            # optuna's points low + k * step (tune.quniform rounds to multiples of step instead), each as likely
            return tune.choice(_float_grid(dist))
        return tune.loguniform(dist.low, dist.high) if dist.log else tune.uniform(dist.low, dist.high)
    raise TypeError(f"unsupported distribution {dist!r}")  # pragma: no cover - spaces makes only these


def _float_grid(dist: FloatDistribution) -> list[float]:
    """The values a float distribution with a step takes in optuna: low + k * step up to high."""
    assert dist.step is not None
    return [dist.low + k * dist.step for k in range(round((dist.high - dist.low) / dist.step) + 1)]


def _mutation(dist: Any) -> Any:
    """What PBT may change a parameter to: a list of values (choices, a float's steps), which PBT shifts to a
    neighbour or resamples; else the domain, whose value PBT multiplies by 0.8 or 1.2 (it would leave the
    grid of a stepped float, and fail on a choice of strings)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        return _float_grid(dist)
    return tune_domain(dist)


def build_scheduler(cfg: StudyConfig, space: SearchSpace, n_train: int, source: str) -> Any:
    """The configured Ray scheduler, its times in training examples seen; None for ``none``.

    Defaults follow the optuna backend's evaluation schedule: the first evaluation point is the grace
    period, the longest run (the most epochs the space allows) is ``max_t``. HyperBand has no grace
    period (its smallest budget is one time unit), so it counts evaluations instead of examples.
    """
    name = cfg.ray.scheduler
    if name == "none":
        return None
    from ray.tune import schedulers

    cls = getattr(schedulers, _SCHEDULERS[name])
    options = dict(cfg.ray.scheduler_options)
    accepted = {n for n in inspect.signature(cls.__init__).parameters if n != "self"} - _RESERVED
    problems = [
        f"{source}: ray.scheduler_options.{k}: "
        + (
            "set by llmflow-hpo; remove it"
            if k in _RESERVED
            else f"not an option of Ray's {cls.__name__}; accepted: {', '.join(sorted(accepted))}"
        )
        for k in options
        if k not in accepted
    ]
    if problems:
        raise ConfigError(problems)
    interval = first_evaluation_step(cfg, n_train)  # the first evaluation point: examples between two of them
    max_epochs = longest_epochs(cfg, space)
    # max_t lies one example past the last evaluation: a run that reaches its end is not stopped there,
    # so it still reports its costs (train time, throughput) after its last evaluation.
    max_t = max_epochs * n_train + 1
    if name == "asha":
        options.setdefault("max_t", max_t)
        options.setdefault("grace_period", interval)
        options.setdefault("reduction_factor", 3)
    elif name == "hyperband":
        options.setdefault("max_t", max_epochs * cfg.train.evals_per_epoch + 1)
    elif name == "median":
        options.setdefault("grace_period", interval)
        options.setdefault("min_samples_required", 3)
    elif name == "pbt":
        mutable = {k: _mutation(d) for k, d in space.items() if k in PBT_MUTABLE}
        if not mutable:
            raise ConfigError(
                f"{source}: ray.scheduler: pbt mutates {', '.join(PBT_MUTABLE)}; the search space has none of them"
            )
        options["hyperparam_mutations"] = mutable
        options.setdefault("perturbation_interval", 2 * interval)
    try:
        return cls(time_attr=EVALUATION if name == "hyperband" else STEP, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: ray.scheduler_options: Ray's {cls.__name__} refused them: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Ray itself.


@contextlib.contextmanager
def ray_session(cfg: StudyConfig, log: Log) -> Iterator[Any]:
    """Join ``ray.address``, or start a local Ray (loopback only, temporary files in ``ray.dir/tmp``)."""
    import logging

    import ray

    if cfg.ray.address:
        try:
            ray.init(address=cfg.ray.address, logging_level=logging.WARNING, log_to_driver=True)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"ray.address {cfg.ray.address}: cannot join the Ray cluster ({reason})") from None
        log(f"ray: joined the cluster at {cfg.ray.address} ({_resources_text(ray)})")
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    assert cfg.ray.dir is not None
    tmp = Path(cfg.ray.dir) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    # Ray's sockets live under its temporary folder and a socket path holds at most 107 bytes: a deep
    # study folder is reached through a short link in the system's temporary folder.
    link = None
    temp_dir = str(tmp)
    if len(temp_dir) > 40:
        digest = hashlib.sha256(f"{tmp}:{os.getpid()}".encode()).hexdigest()[:10]
        link = Path(tempfile.gettempdir()) / f"llmflow-ray-{digest}"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(tmp, target_is_directory=True)
        temp_dir = str(link)
    started = time.perf_counter()
    ray.init(
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
        _temp_dir=temp_dir,
    )
    address = ray.util.get_node_ip_address()
    log(
        f"ray: started a local Ray on {address} in {time.perf_counter() - started:.1f}s ({_resources_text(ray)}), "
        f"temporary files in {tmp}"
    )
    try:
        yield ray
    finally:
        # ray.shutdown() returns before the actor processes it stops have exited: those that hold a staging
        # folder are waited for (a few seconds at most), so that _drop_stale_staging finds them gone.
        staging = Path(tempfile.gettempdir())
        actors = [
            p for p in psutil.Process().children(recursive=True) if (staging / f"llmflow-ray-trial-{p.pid}").exists()
        ]
        ray.shutdown()
        psutil.wait_procs(actors, timeout=10)
        if link is not None:
            with contextlib.suppress(OSError):
                link.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
        _drop_stale_staging()


def _drop_stale_staging() -> None:
    """Trial staging folders (``ray_trial``) of actor processes that are gone: a trial stopped by the
    scheduler, or a killed actor, leaves its last checkpoint there. Local Ray only: the actors ran here."""
    for folder in Path(tempfile.gettempdir()).glob("llmflow-ray-trial-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _resources_text(ray: Any) -> str:
    res = ray.cluster_resources()
    return f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"


def _in_memory(features: Any) -> Any:
    """The tokenized splits as in-memory tables, so Ray ships them to every node (no path to the cache)."""
    import datasets

    splits = {
        name: datasets.Dataset(datasets.table.InMemoryTable(ds.data.table), fingerprint=ds._fingerprint)
        for name, ds in features.splits.items()
    }
    return dataclasses.replace(features, splits=splits)


def _runs(cfg: StudyConfig) -> list[str]:
    """The study's earlier Ray runs in ``ray.dir``, oldest first."""
    found = []
    k = 1
    while tune.Tuner.can_restore(_run_path(cfg, f"{cfg.study_name}-run{k}")):
        found.append(f"{cfg.study_name}-run{k}")
        k += 1
    return found


def _run_path(cfg: StudyConfig, run: str) -> str:
    assert cfg.ray.dir is not None
    return f"{cfg.ray.dir.rstrip('/')}/{run}"


def _ray_running(study: optuna.Study, run: str | None = None) -> list[Any]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get("backend") == "ray" and (run is None or t.user_attrs.get("ray_run") == run)
    ]


def _new_tuner(
    cfg: StudyConfig,
    space: SearchSpace,
    trainable: Any,
    *,
    run: str,
    samples: int,
    sampler: optuna.samplers.BaseSampler,
    study: optuna.Study,
    n_train: int,
    source: str,
) -> Any:
    """A Tuner for a new run of ``samples`` trials: the study's sampler through OptunaSearch (PBT: Ray's
    random variants), the configured scheduler, and the StudyRecorder callback."""
    key, mode = metric_key(cfg), "max" if cfg.direction == "maximize" else "min"
    target = study_target(cfg, space)
    assert cfg.storage is not None and target is not None
    recorder = StudyRecorder(
        storage=cfg.storage,
        study_name=cfg.study_name,
        space=space,
        key=key,
        metric=cfg.metric,
        run=run,
        scheduler=cfg.ray.scheduler,
        target=target,
        direction=cfg.direction,
    )
    if cfg.ray.scheduler == "pbt":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg: Any = BasicVariantGenerator(random_state=cfg.seed)
        param_space = {name: tune_domain(dist) for name, dist in space.items()}
    else:
        search_alg = StudySearch(
            run=run,
            space=dict(space),
            metric=key,
            mode=mode,
            sampler=sampler,
            study_name=cfg.study_name,
            storage=study._storage,
        )
        param_space = {}
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=key,
            mode=mode,
            search_alg=search_alg,
            scheduler=build_scheduler(cfg, space, n_train, source),
            num_samples=samples,
            max_concurrent_trials=cfg.ray.max_concurrent_trials,
            time_budget_s=cfg.timeout,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=run,
            storage_path=cfg.ray.dir,
            failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
            # PBT clones a trial's checkpoint some time after choosing it: keep them all until the run
            # ends (then they are deleted); otherwise the latest is all a trial resumes from.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if cfg.ray.scheduler == "pbt" else 1),
            callbacks=[recorder],
            verbose=0,
        ),
    )


def _fit(tuner: Any, cfg: StudyConfig, study: optuna.Study, run: str) -> tuple[set[str], int | None]:
    """Run ``tuner``; returns the Ray trials left unfinished and the signal that interrupted the run."""
    with _sigterm_as_sigint() as got:
        tuner.fit()
    # Ray's saved state says what a restore would continue: trials not yet TERMINATED or ERROR mean the
    # run was interrupted (Ray stops them when it gets SIGINT, after saving its state).
    saved = tune.ExperimentAnalysis(_run_path(cfg, run)).trials
    unfinished = {t.trial_id for t in saved if t.status not in ("TERMINATED", "ERROR")}
    if not unfinished:
        for trial in saved:  # PBT's checkpoints, kept until the end (StudyRecorder drops the others)
            _drop_checkpoints(trial)
    for t in _ray_running(study, run):
        if t.user_attrs.get("ray_trial_id") not in unfinished:  # asked, but Ray's saved state never had it
            with contextlib.suppress(Exception):
                study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "lost: its Ray run ended without it")
                study.tell(t.number, state=TrialState.FAIL)
    return unfinished, (got.get("signum", signal.SIGINT) if unfinished else None)


def run_search(
    cfg: StudyConfig,
    space: SearchSpace,
    space_raw: dict[str, Any],
    *,
    new_study: bool = False,
    log: Log | None = None,
    source: str = "config",
    data: Any = None,
) -> Any:
    """Run the study's missing trials with Ray Tune; an interrupted Ray run is continued first. ``data``: the
    splits already read (``features.read_splits``)."""
    from llmflow_hpo.data.features import prepare_features
    from llmflow_hpo.errors import Interrupted
    from llmflow_hpo.search.backends.optuna_backend import summarize
    from llmflow_hpo.search.strategy import build_pruner, build_sampler
    from llmflow_hpo.study.storage import finished_trials, free_study_name, open_study

    say = log or _stderr
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    features = prepare_features(cfg, log=say, data=data)
    assert cfg.storage is not None and cfg.n_trials is not None
    if new_study:
        cfg.study_name = free_study_name(cfg.storage, cfg.study_name)
        say(f"study {cfg.study_name}: a new study, as --new-study asked")
    n_train = len(features.splits["train"])
    build_scheduler(cfg, space, n_train, source)  # bad scheduler options: refused before Ray starts
    sampler = build_sampler(cfg, space)
    study = open_study(
        cfg, space_raw, sampler=sampler, pruner=build_pruner(cfg, n_train, space), data_report=features.report
    )
    done = finished_trials(study)
    runs = _runs(cfg)
    resume = runs[-1] if runs and _ray_running(study, runs[-1]) else None
    target = study_target(cfg, space)
    assert target is not None
    remaining = max(target - done, 0)
    if done:
        say(f"study {cfg.study_name}: continuing, {done} finished trial(s) already stored")
    if remaining == 0 and resume is None:
        say(f"study {cfg.study_name}: already holds {done} finished trials (n_trials={cfg.n_trials}); nothing to run")
        return summarize(study, cfg, 0, 1, target)
    start = time.perf_counter()
    from llmflow_hpo.views.tracking import search_tracking

    progress = as_progress(say)
    with search_tracking(cfg, study, log=progress.warn) as tracking:
        DRIVER[cfg.study_name] = (progress, tracking)
        try:
            with ray_session(cfg, say) as ray:
                gpus = cfg.ray.gpus_per_trial
                if gpus is None:
                    gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
                every_eval = cfg.ray.scheduler in ("pbt", "hyperband")
                trainable = tune.with_resources(
                    tune.with_parameters(
                        ray_trial, cfg=cfg, space=space, features=_in_memory(features), every_eval=every_eval
                    ),
                    {"cpu": cfg.ray.cpus_per_trial, "gpu": gpus},
                )
                while True:
                    if resume is not None:
                        run = resume
                        say(
                            f"study {cfg.study_name}: continuing the interrupted Ray run {run} "
                            f"({len(_ray_running(study, run))} trial(s) were running)"
                        )
                        tuner = tune.Tuner.restore(
                            _run_path(cfg, run), trainable, resume_unfinished=True, resume_errored=False
                        )
                    else:
                        run = f"{cfg.study_name}-run{len(runs) + 1}"
                        runs.append(run)
                        say(
                            f"study {cfg.study_name}: Ray run {run}: {remaining} trial(s), {cfg.ray.scheduler} scheduler, "
                            f"{cfg.ray.cpus_per_trial:g} CPU and {gpus:g} GPU per trial, "
                            f"at most {cfg.ray.max_concurrent_trials or 'as many as fit'} at once, storage {cfg.storage}"
                        )
                        tuner = _new_tuner(
                            cfg,
                            space,
                            trainable,
                            run=run,
                            samples=remaining,
                            sampler=sampler,
                            study=study,
                            n_train=n_train,
                            source=source,
                        )
                    unfinished, interrupted = _fit(tuner, cfg, study, run)
                    if interrupted is not None:
                        say(f"study {cfg.study_name}: search took {time.perf_counter() - start:.1f}s")
                        say(
                            f"study {cfg.study_name}: Ray run {run} interrupted with {len(unfinished)} unfinished trial(s), "
                            "its state saved; rerun the same command to continue it"
                        )
                        raise Interrupted(interrupted)
                    remaining = max(target - finished_trials(study), 0)
                    # A restored run ran only the trials it had; a new run fills what is still missing (n_trials may
                    # have grown since). A new run is not repeated: what failed in it stays failed, as in the
                    # optuna backend.
                    if resume is None or remaining == 0:
                        break
                    resume = None
        finally:
            DRIVER.pop(cfg.study_name, None)
    say(f"study {cfg.study_name}: search took {time.perf_counter() - start:.1f}s")
    return summarize(study, cfg, finished_trials(study) - done, 1, target)


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[dict[str, int]]:
    """Ray Tune stops gracefully on SIGINT (state saved, trials resumable); SIGTERM gets the same treatment."""
    got: dict[str, int] = {}

    def handler(signum: int, _frame: Any) -> None:
        got["signum"] = signum
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)
