"""The optuna backend: one process runs trials of the study until it holds ``n_trials`` finished ones."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmflow_hpo.config import StudyConfig
from llmflow_hpo.errors import TrialFailure
from llmflow_hpo.features import prepare_features
from llmflow_hpo.objective import Objective
from llmflow_hpo.spaces import SearchSpace
from llmflow_hpo.storage import finished_trials, open_study
from llmflow_hpo.strategy import build_pruner, build_sampler

__all__ = ["SearchSummary", "run_search"]

Log = Callable[[str], None]


@dataclass
class SearchSummary:
    study_name: str
    storage: str
    ran: int
    counts: dict[str, int]
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]


def _counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state.name.lower(): sum(1 for t in trials if t.state == state) for state in TrialState}


def _best(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


class _Progress:
    """One line per finished trial: its outcome, the study's counts and the best value so far."""

    def __init__(self, target: int | None, metric: str, log: Log) -> None:
        self.target, self.metric, self.log = target, metric, log

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        counts = _counts(study)
        if trial.state == TrialState.COMPLETE:
            outcome = f"complete  dev {self.metric}={trial.value:.4f} at step {trial.user_attrs.get('best_step')}"
        elif trial.state == TrialState.PRUNED:
            outcome = f"pruned    at step {trial.user_attrs.get('pruned_at_step', trial.last_step)}"
        else:
            outcome = f"{trial.state.name.lower():9s} {trial.user_attrs.get('fail_reason', '')}"
        finished = counts["complete"] + counts["pruned"]
        best = _best(study)
        best_text = f"best {best.value:.4f} (trial {best.number})" if best else "best -"
        target = f"/{self.target}" if self.target else ""
        seconds = (trial.duration.total_seconds()) if trial.duration else 0.0
        self.log(
            f"trial {trial.number:3d} {outcome} [{seconds:.1f}s] | finished {finished}{target} "
            f"(complete {counts['complete']}, pruned {counts['pruned']}, failed {counts['fail']}) | {best_text}"
        )


def run_search(
    cfg: StudyConfig, space: SearchSpace, space_raw: dict[str, Any], *, log: Log | None = None
) -> SearchSummary:
    """Tokenize once, open (or continue) the study, and run the missing trials."""
    say = log or (lambda line: print(line, file=sys.stderr))
    # Our progress lines report each trial (fail reasons included); optuna would repeat them with tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    features = prepare_features(cfg, log=say)
    sampler, pruner = build_sampler(cfg, space), build_pruner(cfg)
    study = open_study(cfg, space_raw, sampler=sampler, pruner=pruner, data_report=features.report)
    done = finished_trials(study)
    remaining = None if cfg.n_trials is None else max(cfg.n_trials - done, 0)
    if done:
        say(f"study {cfg.study_name}: continuing, {done} finished trial(s) already stored")
    if remaining == 0:
        say(f"study {cfg.study_name}: already holds {done} finished trials (n_trials={cfg.n_trials}); nothing to run")
    else:
        say(
            f"study {cfg.study_name}: running {remaining if remaining is not None else 'unbounded'} trial(s) "
            f"({cfg.sampler.name} sampler, {cfg.pruner.name} pruner, dev {cfg.metric} {cfg.direction}), storage {cfg.storage}"
        )
        start = time.perf_counter()
        callbacks: list[Any] = [_Progress(cfg.n_trials, cfg.metric, say)]
        if cfg.n_trials is not None:
            callbacks.append(
                optuna.study.MaxTrialsCallback(cfg.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
            )
        study.optimize(
            Objective(cfg, space, features),
            # Failed trials do not count towards n_trials: allow as many retries; MaxTrialsCallback stops at the target.
            n_trials=None if remaining is None else 2 * remaining,
            timeout=cfg.timeout,
            catch=(TrialFailure,),
            callbacks=callbacks,
            gc_after_trial=True,
        )
        say(f"study {cfg.study_name}: search took {time.perf_counter() - start:.1f}s")
    best = _best(study)
    return SearchSummary(
        study_name=cfg.study_name,
        storage=str(cfg.storage),
        ran=finished_trials(study) - done,
        counts=_counts(study),
        best_number=best.number if best else None,
        best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
    )
