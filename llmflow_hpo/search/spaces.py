"""Search spaces: a YAML file of parameter declarations becomes optuna distributions.

One representation serves every backend (Ray Tune's OptunaSearch takes optuna distributions as is). Which
names are searchable, and each value's type and domain, are the hyperparameters' declarations
(``config/hyperparameters``); this module knows only the file's shape (``type``, ``low``, ``choices``, ...).

A search-space file maps hyperparameter names to declarations::

    learning_rate: {type: float, low: 1.0e-5, high: 3.0e-4, log: true}
    batch_size:    {type: categorical, choices: [8, 16, 32]}
    epochs:        {type: int, low: 1, high: 3}
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FixedTrial

from llmflow_hpo.config.hyperparameters import HYPERPARAMETERS, Hyperparameter
from llmflow_hpo.config.yamlfile import read_yaml
from llmflow_hpo.errors import ConfigError

__all__ = [
    "SearchSpace",
    "combination_problems",
    "load_search_space",
    "parse_search_space",
    "stepped_values",
    "suggest_params",
    "trial_params",
]

SearchSpace = dict[str, BaseDistribution]

_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


def _number(value: Any, integer: bool) -> float | int | None:
    if isinstance(value, bool):
        return None
    if integer:
        return value if isinstance(value, int) else None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _repeated(values: list[Any]) -> list[Any]:
    """The values that occur more than once (1e-5 and 1.0e-5 are one value once read)."""
    seen: list[Any] = []
    repeated: list[Any] = []
    for value in values:
        key = (type(value), value)
        if key in seen and value not in repeated:
            repeated.append(value)
        seen.append(key)
    return repeated


def _step_problem(low: float, high: float, step: float, integer: bool) -> str | None:
    """Why ``step`` does not divide ``low..high`` (optuna would silently shrink the range), or None."""
    count = (high - low) / step
    if integer:
        if (high - low) % step == 0:
            return None
    elif abs(count - round(count)) <= 1e-8 * max(1.0, abs(count)):
        return None
    below, above = low + math.floor(count) * step, low + math.ceil(count) * step
    if not integer:
        below, above = float(f"{below:.12g}"), float(f"{above:.12g}")
    return (
        f"{step:g} does not divide the range {low:g}..{high:g} (optuna would search only {low:g}..{below:g}); "
        f"set high to {below:g} or {above:g}, or use a step that divides {float(f'{high - low:.12g}'):g}"
    )


def _parse_one(name: str, spec: Any, where: str, problems: list[str], stored: bool) -> BaseDistribution | None:
    """The distribution of one declaration of the file, or None after recording its problems."""
    at = f"{where}: {name}"
    hp = HYPERPARAMETERS.get(name)
    if hp is None:
        hint = difflib.get_close_matches(name, HYPERPARAMETERS, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else f"; searchable: {', '.join(HYPERPARAMETERS)}"
        problems.append(f"{at}: not a searchable hyperparameter{extra}")
        return None
    if not isinstance(spec, dict):
        problems.append(f"{at}: expected a mapping like {{type: float, low: ..., high: ...}}, got {spec!r}")
        return None
    kind = spec.get("type")
    if kind not in _KEYS:
        problems.append(f"{at}.type: got {kind!r}; expected float, int or categorical")
        return None
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        problems.append(
            f"{at}: unknown key(s) {', '.join(unknown)} for type {kind}; allowed: {', '.join(sorted(_KEYS[kind]))}"
        )
        return None
    if kind == "categorical":
        return _categorical(hp, spec, at, problems, stored)
    return _numeric(hp, spec, kind == "int", at, problems, stored)


def _categorical(
    hp: Hyperparameter, spec: dict[str, Any], at: str, problems: list[str], stored: bool
) -> CategoricalDistribution | None:
    """``{type: categorical, choices: [...]}``: each choice converted to the hyperparameter's type and checked
    against its domain ("1e-5", as YAML 1.1 reads it, becomes a float)."""
    before = len(problems)
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        problems.append(f"{at}.choices: expected a non-empty list")
        return None
    converted = []
    for choice in choices:
        if not (choice is None or isinstance(choice, (bool, int, float, str))):
            problems.append(f"{at}.choices: {choice!r} is not a scalar")
            continue
        value, why = hp.coerce(choice)
        if why:
            problems.append(f"{at}.choices: {choice!r}: {why}")
        converted.append(value)
    repeated = _repeated(converted)
    if repeated and not stored:
        problems.append(
            f"{at}.choices: repeated values in {choices!r}: {', '.join(map(repr, repeated))} appear(s) more "
            "than once as read (1e-5 and 1.0e-5 are one number); drop the repeats"
        )
    return CategoricalDistribution(converted) if len(problems) == before else None


def _range_keys(spec: dict[str, Any], integer: bool, at: str, problems: list[str]) -> tuple[Any, Any, Any, Any]:
    """``low``, ``high``, ``log`` and ``step`` of a float or int declaration, each of the right kind (a problem
    recorded for each one that is not)."""
    low, high = _number(spec.get("low"), integer), _number(spec.get("high"), integer)
    expected = "an integer" if integer else "a number"
    if low is None:
        problems.append(f"{at}.low: expected {expected}, got {spec.get('low')!r}")
    if high is None:
        problems.append(f"{at}.high: expected {expected}, got {spec.get('high')!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"{at}.log: expected true or false, got {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, integer)
        if step is None or step <= 0:
            problems.append(
                f"{at}.step: expected a positive {'integer' if integer else 'number'}, got {spec.get('step')!r}"
            )
        elif log is True:
            problems.append(f"{at}: step and log cannot be combined; drop one of them")
    return low, high, log, step


def _numeric(
    hp: Hyperparameter, spec: dict[str, Any], integer: bool, at: str, problems: list[str], stored: bool
) -> BaseDistribution | None:
    """``{type: float|int, low, high, log?, step?}``: a range whose bounds are values of the hyperparameter."""
    before = len(problems)
    low, high, log, step = _range_keys(spec, integer, at, problems)
    if len(problems) > before:
        return None
    if low >= high:
        problems.append(f"{at}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        problems.append(f"{at}.low: log scale needs low > 0, got {low}")
    for bound in (low, high):
        why = hp.coerce(bound)[1]
        if why:
            problems.append(f"{at}: bound {bound}: {why}")
    if len(problems) > before:
        return None
    if step is not None and not stored:
        why = _step_problem(low, high, step, integer)
        if why:
            problems.append(f"{at}.step: {why}")
            return None
    if integer:
        return IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    return FloatDistribution(float(low), float(high), log=log, step=step)


def parse_search_space(raw: Any, *, source: str, stored: bool = False) -> SearchSpace:
    """Validate a raw search-space mapping; every problem is reported at once.

    ``stored``: an existing study's space, read back from its storage; a step that does not divide its range
    and choices repeated once read refuse new studies only, so a study stored before those checks is still read.
    """
    if raw is None:
        raise ConfigError(f"{source}: the search space is empty; declare at least one parameter")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of parameter names to declarations")
    problems: list[str] = []
    space: SearchSpace = {}
    for name, spec in raw.items():
        dist = _parse_one(str(name), spec, source, problems, stored)
        if dist is not None:
            space[str(name)] = dist
    if problems:
        raise ConfigError(problems)
    if not space:
        raise ConfigError(f"{source}: the search space is empty; declare at least one parameter")
    return space


def combination_problems(train: Any, space: SearchSpace, source: str) -> list[str]:
    """Settings a trial could draw together that do not work together (fixed ``train`` values or searched).

    ``scheduler: constant`` takes no warmup: transformers' constant schedule ignores the warmup steps, so a
    trial with it and a warmup ratio above 0 would silently run without warmup.
    """
    scheduler = space.get("scheduler")
    schedulers = scheduler.choices if isinstance(scheduler, CategoricalDistribution) else (train.scheduler,)
    warmup = space.get("warmup_ratio")
    if isinstance(warmup, CategoricalDistribution):
        warms_up = any(value > 0 for value in warmup.choices)
    elif warmup is not None:
        warms_up = warmup.high > 0
    else:
        warms_up = train.warmup_ratio > 0
    if "constant" not in schedulers or not warms_up:
        return []
    where = "search_space warmup_ratio" if warmup is not None else f"train.warmup_ratio: {train.warmup_ratio:g}"
    field = "search_space scheduler" if scheduler is not None else "train.scheduler"
    return [
        f"{source}: {field}: 'constant' takes no warmup, and this study warms up ({where}): those trials would "
        "run without it; use constant_with_warmup, or set warmup_ratio to 0"
    ]


def load_search_space(path: str | Path) -> tuple[SearchSpace, dict[str, Any]]:
    """Read and validate a search-space file; returns the distributions and the raw mapping (stored in the study)."""
    raw = read_yaml(Path(path))
    return parse_search_space(raw, source=str(path)), raw


def stepped_values(dist: FloatDistribution) -> list[float]:
    """The values a float distribution with a step takes in optuna: low + k * step, up to high (the grid
    sampler's points, and Ray's choices for it)."""
    assert dist.step is not None
    return [dist.low + k * dist.step for k in range(round((dist.high - dist.low) / dist.step) + 1)]


def suggest_params(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Ask ``trial`` (an optuna Trial or FixedTrial) for a value of every parameter of ``space``."""
    params: dict[str, Any] = {}
    for name, dist in space.items():
        if isinstance(dist, FloatDistribution):
            params[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, IntDistribution):
            params[name] = trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
        elif isinstance(dist, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, dist.choices)
        else:  # pragma: no cover - parse_search_space makes only these three
            raise TypeError(f"unsupported distribution {dist!r}")
    return params


def trial_params(best: Any, space: SearchSpace) -> dict[str, Any]:
    """The parameters of a stored trial, asked through the same space (FixedTrial) as during the search."""
    return suggest_params(FixedTrial(best.params), space)
