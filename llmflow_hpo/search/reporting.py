"""Between a training run and its trial: report each evaluation, prune, and store what a trial found.

The rules both backends follow live here once: a non-finite dev metric fails the trial (``check_finite``),
the best evaluation so far (``BestSoFar``), what a resumed run records (``resume_attrs``), the user attributes
of a finished trial (``store_best``, ``store_result``) and how a failed trial is recorded (``record_failure``,
``fail_lost_trial``). The optuna backend's ``TrialReporter`` and the Ray trainable's reporter both call them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmflow_hpo.errors import TrialFailure
from llmflow_hpo.recipe.results import Evaluation, TrainResult, better
from llmflow_hpo.study import records
from llmflow_hpo.study.optuna_private import FirstObjective, report_intermediate, set_trial_user_attr

__all__ = [
    "BestSoFar",
    "TrialReporter",
    "check_finite",
    "fail_lost_trial",
    "record_failure",
    "resume_attrs",
    "store_best",
    "store_result",
]


def check_finite(value: float, metric: str, step: int) -> None:
    """A non-finite dev metric is a failure (never a value, nor PRUNED): ``TrialFailure`` naming it."""
    if not math.isfinite(value):
        raise TrialFailure(f"dev {metric} is {value} at step {step}")


def resume_attrs(history: list[Evaluation]) -> dict[str, int]:
    """What a run resumed from a checkpoint records: where it took up again (nothing for a fresh run)."""
    if not history:
        return {}
    return {records.RESUMED_AT_STEP: history[-1].step, records.RESUMED_AT_OPTIMIZER_STEP: history[-1].optimizer_step}


class BestSoFar:
    """The best evaluation of one run so far, by the study's metric and direction.

    ``restore`` is called once when a run resumes (with the evaluations its checkpoint holds), ``add`` after
    each new evaluation; ``add`` raises ``TrialFailure`` for a non-finite metric (``check_finite``).
    """

    def __init__(self, metric: str, direction: str) -> None:
        self.metric, self.direction = metric, direction
        self.best: Evaluation | None = None

    def _offer(self, evaluation: Evaluation) -> None:
        best = self.best and self.best.metrics[self.metric]  # any value beats none
        if better(evaluation.metrics[self.metric], best, self.direction):
            self.best = evaluation

    def restore(self, history: list[Evaluation]) -> None:
        for evaluation in history:
            self._offer(evaluation)

    def add(self, evaluation: Evaluation) -> float:
        """The evaluation's value of the metric, after checking it and taking it as the best when it is."""
        value = evaluation.metrics[self.metric]
        check_finite(value, self.metric, evaluation.step)
        self._offer(evaluation)
        return value


class TrialReporter:
    """Reports every dev evaluation to the trial, at a step counted in training examples seen.

    Called by the training loop after each evaluation. Raises ``optuna.TrialPruned`` when the pruner
    says so, after storing the best evaluation reached, so a pruned trial still shows what it found, and
    ``TrialFailure`` (the trial fails with the metric and its value as reason) for a non-finite metric.

    ``cost_attribute`` (a quality-against-cost study, where ``trial.report`` and ``should_prune`` raise): the
    metric is stored as the intermediate value all the same and the study's pruner judges the trial on it, as
    in a single-objective study of the metric, against the trials that cost no more than it
    (``optuna_private.FirstObjective``). The cost itself is not judged: it is known before the trial trains,
    and what an evaluation point tells is the metric.
    """

    def __init__(self, trial: optuna.Trial, metric: str, direction: str, *, cost_attribute: str | None = None) -> None:
        self.trial = trial
        self.metric = metric
        self._best = BestSoFar(metric, direction)
        self._first = FirstObjective(trial.study, direction, cost_attribute) if cost_attribute else None

    @property
    def best(self) -> Evaluation | None:
        return self._best.best

    def restore(self, history: list[Evaluation]) -> None:
        """A resumed run: take back the best evaluation. Its values need no reporting again: the retry
        inherited the intermediate values of the attempt it repeats (storage.retry_callback)."""
        self._best.restore(history)
        for key, value in resume_attrs(history).items():
            self.trial.set_user_attr(key, value)

    def __call__(self, evaluation: Evaluation) -> None:
        value = self._best.add(evaluation)
        if self._first is not None:
            report_intermediate(self.trial, evaluation.step, value)
            prune = self._first.should_prune(self.trial)
        else:
            self.trial.report(value, evaluation.step)
            prune = self.trial.should_prune()
        if prune:
            store_best(self.trial, self.best)
            self.trial.set_user_attr(records.PRUNED_AT_STEP, evaluation.step)
            raise optuna.TrialPruned(f"pruned at step {evaluation.step} (dev {self.metric}={value:.4f})")


def record_failure(trial: Any, reason: str, *, for_good: bool) -> None:
    """How a failed trial is recorded on either backend (before it is told FAIL): its ``fail_reason``, and
    ``failed_for_good`` when a retry is pointless (a ``TrialFailure``: diverged, out of memory, a non-finite
    metric). An interrupted, killed or lost trial is not failed for good: its retry may well finish."""
    trial.set_user_attr(records.FAIL_REASON, reason)
    if for_good:
        trial.set_user_attr(records.FAILED_FOR_GOOD, True)


def fail_on_error(study: optuna.Study, trial: Any, error: BaseException) -> None:
    """An unexpected error ends the trial: FAIL with the error as its reason, not for good (the caller re-raises);
    best effort, so that the error itself is what the user sees."""
    with contextlib.suppress(Exception):
        record_failure(trial, f"error: {type(error).__name__}: {error}", for_good=False)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def fail_lost_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """FAIL a RUNNING trial whose runner is gone (a worker that died before it started, a Ray run that ended
    without it), with its reason. Another process that failed it first wins: nothing is raised."""
    with contextlib.suppress(Exception):
        set_trial_user_attr(study, trial, records.FAIL_REASON, reason)
        study.tell(trial.number, state=TrialState.FAIL)


def store_best(trial: Any, best: Evaluation | None) -> None:
    if best is None:
        return
    for name, value in best.metrics.items():
        trial.set_user_attr(records.dev(name), value)
    trial.set_user_attr(records.BEST_STEP, best.step)
    trial.set_user_attr(records.BEST_OPTIMIZER_STEP, best.optimizer_step)
    trial.set_user_attr(records.BEST_EPOCH, round(best.epoch, 4))
    if best.weights_sha256 is not None:
        trial.set_user_attr(records.BEST_WEIGHTS_SHA256, best.weights_sha256)
    if best.samples:
        trial.set_user_attr(records.BEST_SAMPLES, best.samples)


def store_result(trial: Any, result: TrainResult, seed: int) -> None:
    """User attributes of a finished trial: the best evaluation's dev metrics and the run's costs."""
    store_best(trial, result.best)
    trial.set_user_attr(records.SEED, seed)
    trial.set_user_attr(records.EVALUATIONS, len(result.history))
    trial.set_user_attr(records.STOPPED_EARLY, result.stopped_early)
    trial.set_user_attr(records.TRAIN_TIME_S, round(result.train_time_s, 3))
    trial.set_user_attr(records.EXAMPLES_PER_SECOND, round(result.examples_per_second, 2))
    trial.set_user_attr(records.N_PARAMS, result.n_params)
    trial.set_user_attr(records.N_TRAINABLE, result.n_trainable)
    trial.set_user_attr(records.PEAK_MEMORY_MB, round(result.peak_memory_mb, 1))
    trial.set_user_attr(records.PEAK_MEMORY_KIND, result.peak_memory_kind)
    trial.set_user_attr(records.DEVICE, result.device)
    trial.set_user_attr(records.TORCH_THREADS, result.torch_threads)
    # Where the trial's time went: set-up before the first batch, training steps, dev evaluations.
    trial.set_user_attr(records.SETUP_S, round(result.setup_seconds, 3))
    trial.set_user_attr(records.TRAIN_S, round(result.train_seconds, 3))
    trial.set_user_attr(records.EVAL_S, round(result.eval_seconds, 3))
    if result.checkpoints_written or result.checkpoint_seconds:
        trial.set_user_attr(records.CHECKPOINTS_WRITTEN, result.checkpoints_written)
        trial.set_user_attr(records.CHECKPOINT_S, round(result.checkpoint_seconds, 3))
