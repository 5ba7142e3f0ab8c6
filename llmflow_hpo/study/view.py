"""One view of a stored study: trials counted by state, the best trial, and how numbers and durations read.

Every reader of a study uses it: the live progress, the search summary, ``trials``, ``best`` and the
report. The best trial is ``best_trial`` everywhere: the complete trial with the best finite value, the
earlier one on ties (as optuna's ``study.best_trial`` on an SQL storage). Reads trials only; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "ALL_STATES",
    "FINISHED_STATES",
    "StudyView",
    "best_trial",
    "complete_trials",
    "duration_s",
    "format_duration",
    "format_seconds",
    "format_value",
    "params_text",
    "ranked",
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


def complete_trials(trials: Iterable[Any]) -> list[Any]:
    """The complete trials with a finite value (the ones that can be best), in their order."""
    return [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]


def _rank_key(direction: Any) -> Any:
    sign = -1.0 if _direction(direction) == "maximize" else 1.0
    return lambda t: (sign * t.value, t.number)


def ranked(trials: Iterable[Any], direction: Any) -> list[Any]:
    """The complete trials with a finite value, best first (ties: the earlier trial first)."""
    return sorted(complete_trials(trials), key=_rank_key(direction))


def best_trial(trials: Iterable[Any], direction: Any) -> Any | None:
    """The best complete trial (see the module docstring), or None when no trial is complete."""
    return min(complete_trials(trials), key=_rank_key(direction), default=None)


@dataclass(frozen=True)
class StudyView:
    """A study's trials as read once: ``StudyView.of(study)``; the counts and the best trial follow."""

    direction: str  # "maximize" or "minimize"
    metric: str  # the objective's metric as the study stores it (``f1``), "value" for a foreign study
    trials: tuple[FrozenTrial, ...]

    @classmethod
    def of(cls, study: Any) -> StudyView:
        from llmflow_hpo.study import records

        return cls(
            direction=_direction(study.direction),
            metric=study.user_attrs.get(records.METRIC, "value"),
            trials=tuple(study.get_trials(deepcopy=False)),
        )

    @cached_property
    def counts(self) -> dict[str, int]:
        """Trials per state, every state (``ALL_STATES`` order)."""
        return state_counts(self.trials)

    @property
    def finished(self) -> int:
        """Trials that count towards n_trials: complete or pruned."""
        return sum(self.counts[state.name.lower()] for state in FINISHED_STATES)

    @cached_property
    def best(self) -> FrozenTrial | None:
        return best_trial(self.trials, self.direction)


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
