"""Quality against cost: a study with ``objective.cost`` has two values per trial, its dev metric (the study's
direction) and its cost (minimised). Here: the Pareto front of its trials, which of them meet ``max_cost``, and
the rule (``objective.select``) that picks the one trial retrain-best trains and ``best`` shows.

- ``best-metric``: among the trials within ``max_cost``, the best metric (ties: the cheaper, then the earlier).
- ``cheapest-within``: the cheapest trial within ``max_cost`` whose metric is at most ``tolerance`` from the
  best metric among those trials (ties: the better metric, then the earlier).
- ``knee``: on the front of the trials within ``max_cost``, both objectives scaled to [0, 1] over the front,
  the trial farthest from the straight line between the front's two ends (the cheapest and the best): the
  point where paying more cost stops buying much metric. A front of one or two trials, or one with no trial
  above that line (each step up in cost buys as much metric as the last, or more), has no knee: best-metric then.

The functions take the trials already filtered (``study.view`` hands them the complete search trials);
nothing here reads a storage or imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llmflow_hpo.study import records

__all__ = ["COST_ATTRIBUTES", "CostConstraint", "CostObjective", "cost_value", "metric_value", "pareto_front"]

# objective.cost -> the trial attribute that holds it (written before the trial trains, or when it ends).
COST_ATTRIBUTES: Mapping[str, str] = {
    "latency_ms": records.LATENCY_MS,
    "params": records.N_PARAMS,
    "peak_memory_mb": records.PEAK_MEMORY_MB,
}


def metric_value(trial: Any) -> float | None:
    """The trial's value of the objective metric (its first value; optuna's ``trial.value`` raises on a
    two-objective study); None while it has none."""
    values = trial.values
    return float(values[0]) if values else None


def cost_value(trial: Any) -> float | None:
    """The trial's cost (its second value), or None: a single-objective study, or a trial with no values."""
    values = trial.values
    return float(values[1]) if values and len(values) > 1 else None


def _sign(direction: str) -> float:
    """+1 when a higher metric is better (maximize), -1 when lower is."""
    return 1.0 if direction == "maximize" else -1.0


def _q(trial: Any, sign: float) -> float:
    """The metric of a complete trial, higher is better."""
    return sign * float(trial.values[0])


def _c(trial: Any) -> float:
    """The cost of a complete trial."""
    return float(trial.values[1])


def pareto_front(trials: Iterable[Any], direction: str) -> list[Any]:
    """The trials no other trial dominates (at least as good a metric and at most the cost, one of them
    strictly), cheapest first. Trials with equal values are all kept."""
    sign = _sign(direction)
    points = [(t, _q(t, sign), _c(t)) for t in trials]
    front = [t for t, q, c in points if not any(q2 >= q and c2 <= c and (q2 > q or c2 < c) for _, q2, c2 in points)]
    return sorted(front, key=lambda t: (_c(t), -_q(t, sign), t.number))


@dataclass(frozen=True)
class CostObjective:
    """A study's cost objective, from its config's ``objective`` section (stored or loaded)."""

    cost: str  # latency_ms, params or peak_memory_mb
    max_cost: float | None
    select: str
    tolerance: float

    @classmethod
    def of(cls, objective: Mapping[str, Any] | None) -> CostObjective | None:
        """From a config's ``objective`` mapping; None for a single-objective study (or an older one)."""
        if not objective or objective.get("cost") is None:
            return None
        return cls(
            cost=str(objective["cost"]),
            max_cost=objective.get("max_cost"),
            select=str(objective.get("select") or "best-metric"),
            tolerance=float(objective.get("tolerance", 0.01)),
        )

    @classmethod
    def of_config(cls, cfg: Any) -> CostObjective | None:
        """From a loaded ``StudyConfig``; None for a single-objective study."""
        return cls.of(dataclasses.asdict(cfg.objective))

    @property
    def rule(self) -> str:
        """The select rule as the report, the note and the model card name it: ``cheapest-within (tolerance 0.01)``."""
        return f"{self.select} (tolerance {self.tolerance:g})" if self.select == "cheapest-within" else self.select

    @property
    def attribute(self) -> str:
        """The trial attribute that holds the cost."""
        return COST_ATTRIBUTES[self.cost]

    def feasible(self, trial: Any) -> bool:
        """Whether the trial's cost is within ``max_cost`` (always, without a constraint)."""
        cost = cost_value(trial)
        return self.max_cost is None or (cost is not None and cost <= self.max_cost)

    def describe(self, trial: Any) -> str:
        """The trial's cost and the rule that picked it, one indented line (``best``)."""
        limit = f", within max_cost {self.max_cost:g}" if self.max_cost is not None else ""
        return f"  {self.cost}: {cost_value(trial):.4g}; picked from the Pareto front by objective.select: {self.rule}{limit}"

    def pick(self, trials: Iterable[Any], direction: str) -> Any | None:
        """The trial ``select`` picks among the complete ``trials`` within ``max_cost``; None when none is."""
        feasible = [t for t in trials if self.feasible(t)]
        if not feasible:
            return None
        sign = _sign(direction)
        if self.select == "cheapest-within":
            best = max(_q(t, sign) for t in feasible)
            near = [t for t in feasible if _q(t, sign) >= best - self.tolerance - 1e-12]
            return min(near, key=lambda t: (_c(t), -_q(t, sign), t.number))
        if self.select == "knee":
            knee = _knee(pareto_front(feasible, direction), sign)
            if knee is not None:
                return knee
        return min(feasible, key=lambda t: (-_q(t, sign), _c(t), t.number))


def _knee(front: list[Any], sign: float) -> Any | None:
    """The front's knee (see the module docstring), or None: a front of fewer than three trials, or none of
    whose trials lies above the line between its ends (the ends themselves lie on it)."""
    if len(front) < 3:
        return None
    qs, cs = [_q(t, sign) for t in front], [_c(t) for t in front]
    q_span, c_span = max(qs) - min(qs), max(cs) - min(cs)
    if not (q_span > 0 and c_span > 0 and math.isfinite(q_span) and math.isfinite(c_span)):
        return None
    # Scaled, the ends are (0, 0) (the cheapest) and (1, 1) (the best); a point's distance from the line
    # between them is (q - c) / sqrt(2): the largest q - c is the knee, the cheaper one on ties.
    gaps = [(q - min(qs)) / q_span - (c - min(cs)) / c_span for q, c in zip(qs, cs, strict=True)]
    return front[gaps.index(max(gaps))] if max(gaps) > 0 else None


class CostConstraint:
    """optuna's ``constraints_func`` for ``max_cost``: the trial's cost minus ``max_cost`` (<= 0: feasible).

    The samplers call it when a trial ends, before its values are stored, so it reads the cost from the
    trial's attribute (written before the trial trains, so a pruned trial has it too). A pruned trial of a
    peak-memory study has none (peak memory is known at the end): it counts as feasible (0.0) for the sampler.
    A class, not a closure: the sampler is rebuilt per trial and may be pickled.
    """

    def __init__(self, attribute: str, max_cost: float) -> None:
        self.attribute, self.max_cost = attribute, max_cost

    def __call__(self, trial: Any) -> tuple[float]:
        cost = trial.user_attrs.get(self.attribute)
        return (0.0,) if cost is None else (float(cost) - self.max_cost,)
