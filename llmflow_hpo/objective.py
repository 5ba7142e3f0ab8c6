"""The objective: a trial's parameters in, the best dev metric out. A pure function of (trial, config).

Failures are never metric values: a diverged or out-of-memory run ends as FAIL with ``fail_reason``
stored, a pruned run as PRUNED.
"""

from __future__ import annotations

from typing import Any

import optuna

from llmflow_hpo.config import StudyConfig
from llmflow_hpo.errors import TrialFailure
from llmflow_hpo.features import Features
from llmflow_hpo.reporting import TrialReporter, store_result
from llmflow_hpo.spaces import SearchSpace, suggest_params
from llmflow_hpo.train import train_and_evaluate

__all__ = ["Objective"]


class Objective:
    """Callable given to ``study.optimize``; holds only the study's config, space and tokenized data."""

    def __init__(self, cfg: StudyConfig, space: SearchSpace, features: Features) -> None:
        self.cfg = cfg
        self.space = space
        self.features = features

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest_params(trial, self.space)
        seed = self.cfg.seed
        reporter = TrialReporter(trial, self.cfg.metric, self.cfg.direction)
        try:
            result = train_and_evaluate(self.cfg, params, self.features, seed=seed, on_eval=reporter)
        except TrialFailure as e:
            trial.set_user_attr("fail_reason", str(e))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C)")
            raise
        store_result(trial, result, seed)
        if result.best is None:
            reason = "the run ended before its first evaluation"
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailure(reason)
        return result.best.metrics[self.cfg.metric]


def trial_params(best: Any, space: SearchSpace) -> dict[str, Any]:
    """The parameters of a stored trial, asked through the same space (FixedTrial) as during the search."""
    return suggest_params(optuna.trial.FixedTrial(best.params), space)
