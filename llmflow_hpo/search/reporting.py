"""Between a training run and its optuna trial: report each evaluation, prune, and store what a trial found."""

from __future__ import annotations

import math
from typing import Any

import optuna

from llmflow_hpo.errors import TrialFailure
from llmflow_hpo.recipe.train import Evaluation, TrainResult, better

__all__ = ["TrialReporter", "improves", "store_best", "store_result"]


def improves(value: float, best: Evaluation | None, metric: str, direction: str) -> bool:
    """Whether ``value`` beats the best evaluation so far (any value beats none)."""
    return better(value, best and best.metrics[metric], direction)


class TrialReporter:
    """Reports every dev evaluation to the trial, at a step counted in training examples seen.

    Called by the training loop after each evaluation. Raises ``optuna.TrialPruned`` when the pruner
    says so, after storing the best evaluation reached, so a pruned trial still shows what it found, and
    ``TrialFailure`` (the trial fails with the metric and its value as reason) for a non-finite metric.
    """

    def __init__(self, trial: optuna.Trial, metric: str, direction: str) -> None:
        self.trial = trial
        self.metric = metric
        self.direction = direction
        self.best: Evaluation | None = None

    def restore(self, history: list[Evaluation]) -> None:
        """A resumed run: take back the best evaluation. Its values need no reporting again: the retry
        inherited the intermediate values of the attempt it repeats (storage.retry_callback)."""
        for evaluation in history:
            if self._better(evaluation.metrics[self.metric]):
                self.best = evaluation
        if history:
            self.trial.set_user_attr("resumed_at_step", history[-1].step)
            self.trial.set_user_attr("resumed_at_optimizer_step", history[-1].optimizer_step)

    def _better(self, value: float) -> bool:
        return improves(value, self.best, self.metric, self.direction)

    def __call__(self, evaluation: Evaluation) -> None:
        value = evaluation.metrics[self.metric]
        if not math.isfinite(value):  # a failure, never a value (nor PRUNED): the same rule as on Ray
            raise TrialFailure(f"dev {self.metric} is {value} at step {evaluation.step}")
        if self._better(value):
            self.best = evaluation
        self.trial.report(value, evaluation.step)
        if self.trial.should_prune():
            store_best(self.trial, self.best)
            self.trial.set_user_attr("pruned_at_step", evaluation.step)
            raise optuna.TrialPruned(f"pruned at step {evaluation.step} (dev {self.metric}={value:.4f})")


def store_best(trial: Any, best: Evaluation | None) -> None:
    if best is None:
        return
    for name, value in best.metrics.items():
        trial.set_user_attr(f"dev_{name}", value)
    trial.set_user_attr("best_step", best.step)
    trial.set_user_attr("best_optimizer_step", best.optimizer_step)
    trial.set_user_attr("best_epoch", round(best.epoch, 4))
    if best.weights_sha256 is not None:
        trial.set_user_attr("best_weights_sha256", best.weights_sha256)


def store_result(trial: Any, result: TrainResult, seed: int) -> None:
    """User attributes of a finished trial: the best evaluation's dev metrics and the run's costs."""
    store_best(trial, result.best)
    trial.set_user_attr("seed", seed)
    trial.set_user_attr("evaluations", len(result.history))
    trial.set_user_attr("stopped_early", result.stopped_early)
    trial.set_user_attr("train_time_s", round(result.train_time_s, 3))
    trial.set_user_attr("examples_per_second", round(result.examples_per_second, 2))
    trial.set_user_attr("n_params", result.n_params)
    trial.set_user_attr("peak_memory_mb", round(result.peak_memory_mb, 1))
    trial.set_user_attr("peak_memory_kind", result.peak_memory_kind)
    trial.set_user_attr("device", result.device)
    trial.set_user_attr("torch_threads", result.torch_threads)
    # Where the trial's time went: set-up before the first batch, training steps, dev evaluations.
    trial.set_user_attr("setup_s", round(result.setup_seconds, 3))
    trial.set_user_attr("train_s", round(result.train_seconds, 3))
    trial.set_user_attr("eval_s", round(result.eval_seconds, 3))
    if result.checkpoints_written or result.checkpoint_seconds:
        trial.set_user_attr("checkpoints_written", result.checkpoints_written)
        trial.set_user_attr("checkpoint_s", round(result.checkpoint_seconds, 3))
