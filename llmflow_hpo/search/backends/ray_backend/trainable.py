"""Inside a Ray worker: the function Ray runs for one trial, its reporter and its checkpoint.

``ray_trial`` trains one configuration with the same recipe as the optuna backend; ``RayReporter`` sends
every dev evaluation to ``tune.report`` (by the rules of ``search.reporting``: a non-finite metric fails
the trial, the best so far, the attributes a finished trial stores). Ray pickles ``ray_trial`` by its
module path (``tune.with_parameters``): this module must stay importable on every node.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import TrialFailure
from llmflow_hpo.recipe.checkpoints import RESUME, TrialCheckpoint
from llmflow_hpo.search.backends.ray_backend.schedulers import EVALUATION, STEP, metric_key
from llmflow_hpo.search.budget import Budget
from llmflow_hpo.search.reporting import BestSoFar, resume_attrs, store_best, store_result
from llmflow_hpo.search.spaces import SearchSpace
from llmflow_hpo.study import records

__all__ = ["RayReporter", "RayTrialCheckpoint", "ray_trial", "staging_folder"]


class _AttrSink:
    """Collects what ``reporting.store_result`` would set on an optuna trial, to send it with a report."""

    def __init__(self) -> None:
        self.attrs: dict[str, Any] = {}

    def set_user_attr(self, key: str, value: Any) -> None:
        self.attrs[key] = value


class RayReporter:
    """The training loop's ``on_eval`` under Ray: each evaluation goes to ``tune.report`` with the step,
    the best value so far and its metrics, and the checkpoint when the loop has just written one. With the
    search's ``budget``, it ends the run at the evaluation after which the next would end past it (as the
    optuna backend's objective does): the trial completes with its best, tagged ``stopped_by_budget``."""

    def __init__(self, cfg: StudyConfig, checkpoint: Any, n_train: int, budget: Budget | None = None) -> None:
        self.metric, self.key = cfg.metric, metric_key(cfg)
        self.points_per_example = cfg.train.evals_per_epoch / n_train
        self.checkpoint = checkpoint
        self._best = BestSoFar(cfg.metric, cfg.direction)
        self.extra: dict[str, Any] = {records.WORKER: f"{socket.gethostname()}:{os.getpid()}", records.SEED: cfg.seed}
        self._written = 0
        self._clock = budget.clock() if budget is not None else None

    @property
    def best(self) -> Any:
        return self._best.best

    def restore(self, history: list[Any]) -> None:
        self._best.restore(history)
        self.extra.update(resume_attrs(history))
        if self.checkpoint is not None:
            self._written = self.checkpoint.written

    def _attrs(self) -> dict[str, Any]:
        sink = _AttrSink()
        store_best(sink, self.best)
        return {**sink.attrs, **self.extra}

    def __call__(self, evaluation: Any) -> bool:
        """Report the evaluation; True when the budget ends the run here."""
        value = self._best.add(evaluation)
        checkpoint = None
        if self.checkpoint is not None and self.checkpoint.written > self._written:
            self._written = self.checkpoint.written
            checkpoint = tune.Checkpoint.from_directory(str(self.checkpoint.folder))
        # "final": a scheduler stopping the trial at the last evaluation stops a finished run
        report = self._report(evaluation, value, self.best.metrics[self.metric], evaluation.last, self._attrs())
        report["metrics"] = dict(evaluation.metrics)  # every dev metric, for the trackers
        tune.report(report, checkpoint=checkpoint)
        if checkpoint is not None:  # Ray has copied it to ray.dir: no second copy on the worker's disk
            (self.checkpoint.folder / RESUME).unlink(missing_ok=True)
        if self._clock is None or evaluation.last or not self._clock.spent_after():
            return False
        self.extra[records.STOPPED_BY_BUDGET] = True  # sent with the final report
        return True

    def final(self, result: Any, seed: int) -> None:
        """The run ended by itself (all epochs, or early stopping): the run's costs, at the last step again."""
        sink = _AttrSink()
        store_result(sink, result, seed)
        last = result.history[-1]
        best = result.best.metrics[self.metric]
        tune.report(self._report(last, last.metrics[self.metric], best, True, {**sink.attrs, **self.extra}))

    def _report(self, evaluation: Any, value: float, best_value: float, final: bool, attrs: dict) -> dict[str, Any]:
        """One result for Ray: the value at the evaluation's step (examples seen and evaluation number)."""
        return {
            self.key: value,
            STEP: evaluation.step,
            EVALUATION: round(evaluation.step * self.points_per_example),
            "best_value": best_value,
            "train_loss": evaluation.train_loss,
            "final": final,
            "attrs": attrs,
        }


class RayTrialCheckpoint(TrialCheckpoint):
    """Only the resume state, handed to Ray with the next report; Ray keeps the trial's checkpoints.

    The best model weights are not written: the optuna backend keeps them for ``checkpoint.keep_best``,
    Ray trials leave the model to ``retrain-best``.
    """

    def remember_best(self, model: Any) -> None:
        pass

    def finish(self) -> None:
        pass


def staging_folder(pid: int) -> Path:
    """The staging folder of the actor process ``pid`` (its trial's checkpoint before Ray copies it)."""
    return Path(tempfile.gettempdir()) / f"llmflow-ray-trial-{pid}"


def ray_trial(
    config: dict[str, Any],
    *,
    cfg: StudyConfig,
    space: SearchSpace,
    features: Any,
    every_eval: bool,
    budget: Budget | None = None,
) -> None:
    """The Ray Tune trainable: train one configuration, reporting every dev evaluation to Ray.

    ``every_eval``: checkpoint after every evaluation (PBT clones them, HyperBand pauses on them);
    otherwise the study's checkpoint policy (at most ``checkpoint.max_overhead`` of the trial's time).
    ``budget``: the search's (its end on the wall clock), which ends the run at an evaluation.
    """
    import logging

    from llmflow_hpo.recipe.runtime import runtime_attrs
    from llmflow_hpo.recipe.train import train_and_evaluate

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # "Checkpoint successfully created" per report
    params = {name: config[name] for name in space}
    cfg = copy.deepcopy(cfg)
    if cfg.train.num_threads is None:
        cfg.train.num_threads = max(1, int(cfg.ray.cpus_per_trial))
    # One staging folder per actor process, emptied when a trial starts: a trial the scheduler stops does
    # not unwind (its thread is dropped), so what it left is removed by the actor's next trial.
    folder = staging_folder(os.getpid())
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
        reporter = RayReporter(cfg, checkpoint, len(features.splits["train"]), budget)
        reporter.extra.update(runtime_attrs(cfg, params))
        result = train_and_evaluate(
            cfg, params, features, seed=cfg.seed, on_eval=reporter, checkpoint=checkpoint, on_resume=reporter.restore
        )
        if result.best is None:
            raise TrialFailure("the run ended before its first evaluation")
        reporter.final(result, cfg.seed)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
