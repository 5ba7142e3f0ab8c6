"""The start-up design: the first trials a model-based sampler (tpe, gp, cmaes) learns from.

optuna's samplers start with independent random draws. Two or three random points in a space of four
dimensions often share a categorical choice (every start-up trial at batch 32 and the cosine schedule,
and TPE never leaves them). The design instead is a Latin hypercube over every searched dimension
(scipy's ``qmc.LatinHypercube``, seeded by the study's seed): each dimension is cut into n strata and
every stratum is taken once, so a categorical parameter with k choices gets each choice about n/k times,
and the numeric ranges are covered end to end. optuna's QMCSampler draws Sobol points for numeric
parameters only (its categorical ones are independent random draws), which is why this is ours.

Its length: d+1 points for d searched dimensions, at least the largest number of choices, at most the
planned trials (n_trials, or the budget over a typical trial's duration) and at least 2;
``sampler.startup_trials`` sets it. When the budget fits fewer trials than that, the whole search is the
design: a model fitted to fewer than d+1 points exploits noise (the policy benchmark, benchmarks/README.md).
The trials queued first (the defaults trial, a warm start) are not design trials, but the design
completes them: each takes the stratum its value lies in, in every dimension, and the design takes the
others, so the defaults and the design together take every stratum once (not two trials sharing the
defaults' learning rate while the top of its range goes untried).
A design trial is tagged ``records.ORIGIN = design``, its point's index ``records.DESIGN_POINT`` and the
design's length ``records.DESIGN_LENGTH``: the first design trial fixes the length (the plan may change
as trials run, the hypercube must not). The index is the first one no trial has taken, chosen while the study lock is held
(the worker loop claims and draws under it), so workers share one design.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from llmflow_hpo.search.first_trials import DEFAULTS, WARM_START
from llmflow_hpo.search.spaces import SearchSpace
from llmflow_hpo.study import records
from llmflow_hpo.study.optuna_private import set_trial_user_attr, trial_id

__all__ = ["DESIGN", "StartupDesign", "design_length", "design_points", "typical_trial_seconds"]

DESIGN = "design"
_QUEUED_FIRST = (DEFAULTS, WARM_START)


def typical_trial_seconds(trials: list[FrozenTrial]) -> float | None:
    """The median wall time of the complete trials, or None before one completed."""
    seconds = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.state == TrialState.COMPLETE and t.datetime_start is not None and t.datetime_complete is not None
    ]
    return statistics.median(seconds) if seconds else None


def design_length(space: SearchSpace, planned: int | None) -> int:
    """d+1 for d dimensions, at least the most choices a categorical has, at most max(2, planned)."""
    choices = [len(d.choices) for d in space.values() if isinstance(d, CategoricalDistribution)]
    n = max(len(space) + 1, max(choices, default=0))
    return n if planned is None else min(n, max(2, planned))


def _value(u: float, dist: BaseDistribution) -> Any:
    """The point ``u`` in [0, 1) of the unit interval, as a value of ``dist``."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
    low, high = float(dist.low), float(dist.high)
    if isinstance(dist, IntDistribution) and not dist.log:
        count = (dist.high - dist.low) // dist.step + 1
        return dist.low + dist.step * min(int(u * count), count - 1)
    x = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if dist.log else low + u * (high - low)
    if isinstance(dist, IntDistribution):
        return min(max(round(x), dist.low), dist.high)
    assert isinstance(dist, FloatDistribution)
    if dist.step is not None:
        count = round((high - low) / dist.step) + 1
        return low + dist.step * min(int(u * count), count - 1)
    return min(x, high)


def _unit(value: Any, dist: BaseDistribution) -> float | None:
    """Where ``value`` lies in [0, 1] along ``dist`` (a choice: the middle of its stratum); None: outside it."""
    if isinstance(dist, CategoricalDistribution):
        return (dist.choices.index(value) + 0.5) / len(dist.choices) if value in dist.choices else None
    low, high = float(dist.low), float(dist.high)
    if not isinstance(value, int | float) or high <= low:
        return None
    if dist.log:
        u = (math.log(max(value, low)) - math.log(low)) / (math.log(high) - math.log(low))
    else:
        u = (value - low) / (high - low)
    return min(max(u, 0.0), 1.0)


def design_points(
    space: SearchSpace, n: int, seed: int, fixed: Sequence[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """A Latin hypercube of ``n`` strata over ``space``, completing the ``fixed`` trials' points.

    Without fixed trials: ``n`` points (the same for the same seed). Each fixed trial that sets a searched
    dimension takes the stratum its value lies in, in every dimension it sets; the design is the other points,
    one per free stratum (scipy's hypercube over them, its strata mapped onto the free ones in order). scipy
    has no hypercube that completes given points, hence the mapping.
    """
    from scipy.stats import qmc

    names = list(space)
    units = [{k: u for k in names if k in p and (u := _unit(p[k], space[k])) is not None} for p in fixed]
    units = [u for u in units if u]  # a trial that sets no searched dimension covers nothing
    m = n - len(units)
    if m <= 0:
        return []
    unit = qmc.LatinHypercube(d=max(len(names), 1), seed=np.random.default_rng(seed)).random(m)
    for i, name in enumerate(names):
        taken = {min(int(u[name] * n), n - 1) for u in units if name in u}
        free = [s for s in range(n) if s not in taken]  # at least m: each fixed trial takes at most one
        for row in unit:
            rank, offset = divmod(float(row[i]) * m, 1.0)
            row[i] = (free[int(rank) * len(free) // m] + offset) / n
    return [{name: _value(float(row[i]), space[name]) for i, name in enumerate(names)} for row in unit]


class StartupDesign(optuna.samplers.BaseSampler):
    """The start-up design for the first trials, the wrapped sampler (``inner``) after it.

    ``length``: the design's length, fixed (``sampler.startup_trials``) or None for ``design_length``
    over the planned trials: ``n_trials``, or ``budget_s`` over the typical trial's duration so far.
    """

    def __init__(
        self,
        inner: optuna.samplers.BaseSampler,
        space: SearchSpace,
        *,
        seed: int,
        length: int | None,
        n_trials: int | None,
        budget_s: float | None,
    ) -> None:
        self._inner, self._space, self._seed = inner, space, seed
        self._length, self._n_trials, self._budget_s = length, n_trials, budget_s
        self._points: list[dict[str, Any]] = []
        self._key: tuple[int, str] | None = None  # the design's length and the fixed trials it completes
        self._taken: dict[int, dict[str, Any]] = {}  # trial id -> its design point's parameters

    @property
    def inner(self) -> optuna.samplers.BaseSampler:
        return self._inner

    def _planned(self, trials: list[FrozenTrial]) -> int | None:
        if self._n_trials is not None or self._budget_s is None:
            return self._n_trials
        typical = typical_trial_seconds(trials)
        return None if typical is None else int(self._budget_s // max(typical, 1e-9))

    def length(self, trials: list[FrozenTrial]) -> int:
        if self._length is not None:
            return self._length
        return design_length(self._space, self._planned(trials))

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner.before_trial(study, trial)
        if "fixed_params" in trial.system_attrs:  # queued with its parameters: not a design trial
            return
        trials = study.get_trials(deepcopy=False)
        designed = [t.user_attrs for t in trials if records.DESIGN_POINT in t.user_attrs]
        taken = {attrs[records.DESIGN_POINT] for attrs in designed}
        # The first design trial fixes the design: a plan that changes later (trials ran longer than the first)
        # must not cut the hypercube again, or the points already run belong to another one.
        stored = next((a[records.DESIGN_LENGTH] for a in designed if records.DESIGN_LENGTH in a), None)
        n = stored if stored is not None else self.length(trials)
        # The queued first trials (the defaults, a warm start) in the order they were queued: the design completes them.
        fixed = [
            t.system_attrs.get("fixed_params", t.params)
            for t in trials
            if t.user_attrs.get(records.ORIGIN) in _QUEUED_FIRST
        ]
        key = (n, repr(fixed))
        if self._key != key:
            self._points, self._key = design_points(self._space, n, self._seed, fixed), key
        free = [i for i in range(len(self._points)) if i not in taken]
        if not free:
            return
        index = free[0]
        set_trial_user_attr(study, trial, records.ORIGIN, DESIGN)
        set_trial_user_attr(study, trial, records.DESIGN_POINT, index)
        set_trial_user_attr(study, trial, records.DESIGN_LENGTH, n)
        self._taken[trial_id(trial)] = self._points[index]

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if trial_id(trial) in self._taken:
            return dict(self._space)
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if trial_id(trial) in self._taken:
            return {k: v for k, v in self._taken[trial_id(trial)].items() if k in search_space}
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._taken.pop(trial_id(trial), None)
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()
