"""The objective: a trial's parameters in, the best dev metric out. A pure function of (trial, config).

Failures are never metric values: a diverged or out-of-memory run ends as FAIL with ``fail_reason``
stored, a pruned run as PRUNED. Torch is imported when a trial runs (``recipe.train``), not with this module.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from typing import Any

import optuna

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.data.features import Features
from llmflow_hpo.errors import TrialFailure
from llmflow_hpo.recipe.checkpoints import CheckpointStore, TrialCheckpoint
from llmflow_hpo.recipe.results import Evaluation
from llmflow_hpo.search.budget import Budget
from llmflow_hpo.search.reporting import TrialReporter, record_failure, store_result
from llmflow_hpo.search.spaces import SearchSpace, suggest_params
from llmflow_hpo.study import records
from llmflow_hpo.study.front import COST_ATTRIBUTES
from llmflow_hpo.views.progress import Progress
from llmflow_hpo.views.tracking import Tracking

__all__ = ["Objective"]


class Objective:
    """Callable given to the worker loop; holds only the study's config, space, tokenized data and checkpoints."""

    def __init__(
        self,
        cfg: StudyConfig,
        space: SearchSpace,
        features: Features,
        checkpoints: CheckpointStore | None = None,
        log: Callable[[str], None] | None = None,
        progress: Progress | None = None,
        tracking: Tracking | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.cfg = cfg
        self.budget = budget
        self.space = space
        self.features = features
        self.checkpoints = checkpoints
        self.log = log or (lambda line: None)
        self.progress = progress
        self.tracking = tracking

    def _checkpoint(self, trial: optuna.Trial, params: dict[str, Any]) -> TrialCheckpoint | None:
        """This trial's checkpoint; a retry first takes over the folder of the attempt it repeats.

        Every trial records its own number as ``checkpoint_trial``; a retry inherits the user attributes
        of the attempt it repeats, so it finds that number there.
        """
        if self.checkpoints is None:
            return None
        previous = trial.user_attrs.get(records.CHECKPOINT_TRIAL)
        if previous is not None and previous != trial.number:
            trial.set_user_attr(records.FAIL_REASON, None)  # inherited from the attempt; this one has not failed
            trial.set_user_attr(records.RETRY_OF, previous)
            if self.checkpoints.take_over(previous, trial.number):
                self.log(f"trial {trial.number}: retrying trial {previous} from its checkpoint")
            else:
                self.log(f"trial {trial.number}: retrying trial {previous}; no checkpoint of it, starting over")
        trial.set_user_attr(records.CHECKPOINT_TRIAL, trial.number)
        return self.checkpoints.trial(trial.number, params)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        from llmflow_hpo.recipe.runtime import runtime_attrs
        from llmflow_hpo.recipe.train import train_and_evaluate

        params = suggest_params(trial, self.space)
        trial.set_user_attr(records.WORKER, f"{socket.gethostname()}:{os.getpid()}")
        for key, value in runtime_attrs(self.cfg, params).items():  # precision, TF32, ...: pruned trials too
            trial.set_user_attr(key, value)
        seed = self.cfg.seed
        cost = self.cfg.objective.cost  # a quality-against-cost study prunes among trials that cost no more
        reporter = TrialReporter(
            trial, self.cfg.metric, self.cfg.direction, cost_attribute=COST_ATTRIBUTES[cost] if cost else None
        )
        checkpoint = self._checkpoint(trial, params)
        number, progress, tracking = trial.number, self.progress, self.tracking
        epochs = self.cfg.train.with_params(params).epochs
        if progress is not None:
            progress.trial_started(number, params, epochs * len(self.features.splits["train"]))
        if tracking is not None:
            tracking.trial_started(number, params)

        clock = self.budget.clock() if self.budget is not None else None

        def on_eval(evaluation: Evaluation) -> bool:
            # Shown and tracked before the report, which may prune the trial.
            if progress is not None:
                progress.evaluation(number, evaluation.step, evaluation.metrics, evaluation.train_loss)
            if tracking is not None:
                tracking.evaluation(number, evaluation.step, evaluation.metrics, evaluation.train_loss)
            reporter(evaluation)
            if clock is None or evaluation.last or not clock.spent_after():
                return False
            trial.set_user_attr(records.STOPPED_BY_BUDGET, True)  # the run ends here, keeping its best
            return True

        def on_resume(restored: list[Evaluation]) -> None:
            reporter.restore(restored)
            if tracking is not None:  # a retry's curve starts where its first attempt's did
                for evaluation in restored:
                    tracking.evaluation(number, evaluation.step, evaluation.metrics, evaluation.train_loss)

        def on_step(seen: int, total: int, loss: float) -> None:
            assert progress is not None
            progress.step(number, seen, total, loss)

        try:
            result = train_and_evaluate(
                self.cfg,
                params,
                self.features,
                seed=seed,
                on_eval=on_eval,
                checkpoint=checkpoint,
                on_resume=on_resume,
                on_step=on_step if progress is not None and progress.mode == "live" else None,
                on_costs=lambda costs: _set_attrs(trial, costs),  # before it trains: pruned trials have them
            )
        except TrialFailure as e:
            record_failure(trial, str(e), for_good=True)
            raise
        store_result(trial, result, seed)
        if result.best is None:
            reason = "the run ended before its first evaluation"
            record_failure(trial, reason, for_good=True)
            raise TrialFailure(reason)
        return self._values(trial, result.best.metrics[self.cfg.metric])

    def _values(self, trial: optuna.Trial, metric: float) -> float | tuple[float, float]:
        """The trial's value: its best dev metric; in a quality-against-cost study, (metric, cost), the cost as
        its trial attribute holds it."""
        if self.cfg.objective.cost is None:
            return metric
        cost = trial.user_attrs.get(COST_ATTRIBUTES[self.cfg.objective.cost])
        if cost is None or not math.isfinite(cost):
            reason = f"no finite {self.cfg.objective.cost} was measured ({cost})"
            record_failure(trial, reason, for_good=True)
            raise TrialFailure(reason)
        return metric, float(cost)


def _set_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
