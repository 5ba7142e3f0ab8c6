"""One view of a stored study: trials counted by state, the best trial, and how numbers and durations read.

Every reader of a study uses it: the live progress, the search summary, ``trials``, ``best`` and the
report. The best trial is ``best_trial`` everywhere: the complete trial with the best finite value, the
earlier one on ties (as optuna's ``study.best_trial`` on an SQL storage). Reads trials only; no torch.

A study may also hold confirmation trials (``llmflow-hpo confirm``, ``search.confirm``: a search trial's
configuration re-run over several seeds, tagged ``records.CONFIRMS``). They are kept apart: the counts, the
rankings and the best trial are the search trials'; ``confirmed_winner`` is the best confirmation trial.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from llmflow_hpo.study.front import CostObjective, cost_value, metric_value, pareto_front

__all__ = [
    "ALL_STATES",
    "FINISHED_STATES",
    "StudyView",
    "best_trial",
    "complete_trials",
    "config_key",
    "confirmation_summary",
    "confirmation_trials",
    "confirmed_winner",
    "duration_s",
    "format_duration",
    "format_seconds",
    "format_value",
    "is_confirmation",
    "mean_std_text",
    "params_text",
    "ranked",
    "search_trials",
    "short_value",
    "state_counts",
]

# Every trial state, lower-case, in optuna's order: running, complete, pruned, fail, waiting.
ALL_STATES = tuple(state.name.lower() for state in TrialState)

# The states of a finished trial, one that counts towards n_trials: complete or pruned.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def _direction(direction: Any) -> str:
    """``"maximize"``/``"minimize"`` from a string or an optuna StudyDirection."""
    return str(getattr(direction, "name", direction)).lower()


def state_counts(trials: Iterable[Any], states: Sequence[str] = ALL_STATES) -> dict[str, int]:
    """How many trials are in each of ``states`` (lower-case names), in that order."""
    counts = dict.fromkeys(states, 0)
    for t in trials:
        state = t.state.name.lower()
        if state in counts:
            counts[state] += 1
    return counts


def is_confirmation(trial: Any) -> bool:
    """Whether the trial is a confirmation trial (``llmflow-hpo confirm``), not a search trial."""
    from llmflow_hpo.study import records

    return records.CONFIRMS in trial.user_attrs


def search_trials(trials: Iterable[Any]) -> list[Any]:
    """The search's own trials (every trial but the confirmation trials), in their order."""
    return [t for t in trials if not is_confirmation(t)]


def confirmation_trials(trials: Iterable[Any]) -> list[Any]:
    """The confirmation trials, in their order."""
    return [t for t in trials if is_confirmation(t)]


def config_key(trial: Any) -> str:
    """A trial's configuration as a key: two trials with the same parameters are one configuration (a
    categorical space draws some twice), confirmed once."""
    return json.dumps(trial.params, sort_keys=True, default=str)


def _finite_complete(trials: Iterable[Any]) -> list[Any]:
    # metric_value: the first value (a quality-against-cost study's trials have two, and no ``value``)
    return [t for t in trials if t.state == TrialState.COMPLETE and _finite(t.values)]


def _finite(values: Any) -> bool:
    return bool(values) and all(v is not None and math.isfinite(v) for v in values)


def complete_trials(trials: Iterable[Any]) -> list[Any]:
    """The complete search trials with a finite value (the ones that can be best), in their order."""
    return _finite_complete(search_trials(trials))


def _rank_key(direction: Any) -> Any:
    sign = -1.0 if _direction(direction) == "maximize" else 1.0
    return lambda t: (sign * metric_value(t), t.number)


def ranked(trials: Iterable[Any], direction: Any) -> list[Any]:
    """The complete trials with a finite value, best first (ties: the earlier trial first)."""
    return sorted(complete_trials(trials), key=_rank_key(direction))


def best_trial(trials: Iterable[Any], direction: Any) -> Any | None:
    """The best complete trial (see the module docstring), or None when no trial is complete."""
    return min(complete_trials(trials), key=_rank_key(direction), default=None)


def confirmed_winner(trials: Iterable[Any], direction: Any) -> Any | None:
    """The best complete confirmation trial by its value (the selection statistic, mean or lcb; the earlier
    on ties), or None when no configuration has been confirmed."""
    return min(_finite_complete(confirmation_trials(trials)), key=_rank_key(direction), default=None)


@dataclass(frozen=True)
class StudyView:
    """A study's trials as read once: ``StudyView.of(study)``; the counts and the best trial follow."""

    direction: str  # "maximize" or "minimize"
    metric: str  # the objective's metric as the study stores it (``f1``), "value" for a foreign study
    trials: tuple[FrozenTrial, ...]
    objective: CostObjective | None = None  # a quality-against-cost study's cost (``study.front``)

    @classmethod
    def of(cls, study: Any) -> StudyView:
        from llmflow_hpo.study import records

        attrs = study.user_attrs  # a storage query and a deep copy: read once
        return cls(
            direction=_direction(study.directions[0]),  # the metric's (a cost study's second is the cost's)
            metric=attrs.get(records.METRIC, "value"),
            trials=tuple(study.get_trials(deepcopy=False)),
            objective=CostObjective.of((attrs.get(records.CONFIG) or {}).get("objective")),
        )

    @cached_property
    def counts(self) -> dict[str, int]:
        """Search trials per state, every state (``ALL_STATES`` order); confirmation trials not counted."""
        return state_counts(search_trials(self.trials))

    @property
    def finished(self) -> int:
        """Trials that count towards n_trials: complete or pruned."""
        return sum(self.counts[state.name.lower()] for state in FINISHED_STATES)

    @cached_property
    def best(self) -> FrozenTrial | None:
        """The best search trial (confirmation trials never are); of a quality-against-cost study, the trial
        its ``objective.select`` rule picks among those within ``max_cost`` (``study.front``)."""
        if self.objective is not None:
            return self.objective.pick(complete_trials(self.trials), self.direction)
        return best_trial(self.trials, self.direction)

    def why_no_best(self) -> str:
        """Why ``best`` is None, to follow the study's name: no complete trial yet, or none within max_cost."""
        complete = complete_trials(self.trials)
        if not complete or self.objective is None or self.objective.max_cost is None:
            return "has no complete trial yet; run `llmflow-hpo search` first"
        cheapest = min(c for c in map(cost_value, complete) if c is not None)
        return (
            f"has no complete trial within objective.max_cost {self.objective.max_cost:g} ({len(complete)} complete, "
            f"the cheapest at {self.objective.cost} {cheapest:.4g}); search cheaper configurations "
            "(e.g. fewer train.num_layers) or start a new study with a higher max_cost"
        )

    @cached_property
    def front(self) -> list[FrozenTrial]:
        """A quality-against-cost study's Pareto front of its complete search trials, cheapest first (those
        within ``max_cost`` and those not); empty for a single-objective study."""
        if self.objective is None:
            return []
        complete = complete_trials(self.trials)
        feasible = [t for t in complete if self.objective.feasible(t)]
        kept = {t.number: t for t in pareto_front(complete, self.direction) + pareto_front(feasible, self.direction)}
        return sorted(kept.values(), key=lambda t: (cost_value(t), t.number))

    @cached_property
    def confirmations(self) -> tuple[FrozenTrial, ...]:
        """The confirmation trials (``llmflow-hpo confirm``), in their order; empty for most studies."""
        return tuple(confirmation_trials(self.trials))

    @cached_property
    def confirmed(self) -> FrozenTrial | None:
        """The confirmed winner (``confirmed_winner``), or None when nothing was confirmed."""
        return confirmed_winner(self.confirmations, self.direction)


def confirmation_summary(view: StudyView) -> dict[str, Any] | None:
    """The confirmation stage as data (the CLI, the report, the dashboard note and the model card show it);
    None when the study holds no confirmation trial.

    ``rows``: the latest confirmation trial of each configuration, in the order they ran: the trial, the
    search trial it confirms with its single-run value and parameters, its state, seeds, per-seed scores,
    mean, std, lcb, value, and whether it is the confirmed winner. ``winner``: that row, or None while no
    configuration is confirmed; ``single_run``: the best search trial; ``differs``: whether the confirmed
    winner is another configuration than the single-run winner."""
    from llmflow_hpo.study import records

    if not view.confirmations:
        return None
    by_number = {t.number: t for t in view.trials}
    latest = {config_key(t): t for t in view.confirmations}  # later attempts replace earlier
    winner, best = view.confirmed, view.best
    rows = []
    for t in sorted(latest.values(), key=lambda t: t.number):
        attrs, source = t.user_attrs, by_number.get(t.user_attrs[records.CONFIRMS])
        rows.append(
            {
                "trial": t.number,
                "confirms": attrs[records.CONFIRMS],
                "single_run_value": source.value if source is not None else None,
                "params": dict(t.params),
                "state": t.state.name.lower(),
                "seeds": list(attrs.get(records.CONFIRM_SEEDS) or []),
                "scores": list(attrs.get(records.CONFIRM_SCORES) or []),
                "mean": attrs.get(records.CONFIRM_MEAN),
                "std": attrs.get(records.CONFIRM_STD),
                "lcb": attrs.get(records.CONFIRM_LCB),
                "value": t.value,
                "winner": winner is not None and t.number == winner.number,
                "fail_reason": attrs.get(records.FAIL_REASON) if t.state == TrialState.FAIL else None,
            }
        )
    settings = view.confirmations[-1].user_attrs  # every confirmation trial's (a rerun keeps them)
    won = next((r for r in rows if r["winner"]), None)
    return {
        "select": settings.get(records.CONFIRM_SELECT),
        "confidence": settings.get(records.CONFIRM_CONFIDENCE),
        "seeds": list(settings.get(records.CONFIRM_SEEDS) or []),
        "rows": rows,
        "winner": won,
        "single_run": {"trial": best.number, "value": best.value, "params": dict(best.params)} if best else None,
        # by configuration: the single-run winner may be a later draw of the confirmed one
        "differs": None if won is None or best is None else config_key(winner) != config_key(best),
    }


def mean_std_text(row: dict[str, Any], metric: str) -> str:
    """``dev f1 0.8123 +- 0.0102 over 5 seeds (seeds 43, 44, 45, 46, 47)``: a confirmation row in one line."""
    if row["mean"] is None:
        return f"dev {metric}: no seed finished yet"
    n, std = len(row["scores"]), row["std"]
    spread = f" +- {std:.4f}" if std is not None else ""
    seeds = ", ".join(str(s) for s in row["seeds"][:n])
    return f"dev {metric} {row['mean']:.4f}{spread} over {n} seed{'s' if n != 1 else ''} (seeds {seeds})"


# ---------------------------------------------------------------------------------------- formatting


def duration_s(trial: Any) -> float | None:
    """A finished trial's wall time in seconds; None while it has no end."""
    return trial.duration.total_seconds() if trial.duration else None


def format_duration(seconds: float | None) -> str:
    """Compact, for a status line: ``45s``, ``1m05s``, ``1h02m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_seconds(value: float | None) -> str:
    """Spelled out, for a table: ``4.2 s``, ``1 min 5 s``, ``2 h 3 min``; ``-`` when unknown."""
    if value is None:
        return "-"
    if round(value, 1) < 60:
        return f"{value:.1f} s"
    seconds = round(value)
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    minutes = round(value / 60)
    return f"{minutes // 60} h {minutes % 60} min"


def format_value(value: Any) -> str:
    """A parameter or metric in a table: four decimals, three significant digits below 1e-3, yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if not math.isfinite(value):
            return str(value)
        if abs(value) < 1e-3:  # learning rates and the like
            return f"{value:.3g}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.4g}"
    return str(value)


def short_value(value: Any) -> str:
    """A parameter in one line: floats to three significant digits."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def params_text(params: dict[str, Any]) -> str:
    """``name=value, ...`` with ``short_value``: the trial's parameters in one line."""
    return ", ".join(f"{k}={short_value(v)}" for k, v in params.items())
