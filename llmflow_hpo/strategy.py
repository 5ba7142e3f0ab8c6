"""Samplers and pruners: the study config's ``sampler`` and ``pruner`` sections become optuna objects.

Options are checked against the optuna constructors' own signatures, so a misspelt option is a config
error that names it, not a TypeError deep in a run.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from llmflow_hpo.config import StudyConfig
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.spaces import SearchSpace

__all__ = ["build_pruner", "build_sampler", "check_strategy", "default_startup_trials"]

_SAMPLERS: dict[str, str] = {
    "tpe": "TPESampler",
    "random": "RandomSampler",
    "cmaes": "CmaEsSampler",
    "gp": "GPSampler",
    "grid": "GridSampler",
    "qmc": "QMCSampler",
}
_PRUNERS: dict[str, str] = {
    "median": "MedianPruner",
    "percentile": "PercentilePruner",
    "successive-halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "none": "NopPruner",
}
# Set by llmflow-hpo itself, not by the user.
_RESERVED = {"seed", "search_space"}


def default_startup_trials(n_trials: int | None) -> int:
    """Random start-up trials for TPE/GP: a quarter of the budget, at least 2, at most 10.

    optuna's fixed default of 10 turns a 10-trial "TPE" study into a random search.
    """
    if n_trials is None:
        return 10
    return max(2, min(10, n_trials // 4))


def _option_problems(cls: type, options: dict[str, Any], where: str) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    accepted = {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    problems = []
    for key in options:
        if key in _RESERVED:
            problems.append(f"{where}.{key}: set by llmflow-hpo (from the study's seed / search space); remove it")
        elif key not in accepted:
            problems.append(
                f"{where}.{key}: not an option of optuna's {cls.__name__}; accepted: {', '.join(sorted(accepted - _RESERVED))}"
            )
    return problems


def _grid(space: SearchSpace, where: str) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    problems = []
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            count = round((dist.high - dist.low) / dist.step)
            grid[name] = [dist.low + i * dist.step for i in range(count + 1)]
        else:
            problems.append(
                f"{where}: grid sampling needs {name} to be categorical, a linear int, or a float with step; "
                "give it choices or a step"
            )
    if problems:
        raise ConfigError(problems)
    return grid


def check_strategy(cfg: StudyConfig, space: SearchSpace, source: str) -> None:
    """Raise ConfigError for sampler/pruner options optuna would refuse (no sampler is built)."""
    problems = _option_problems(
        getattr(optuna.samplers, _SAMPLERS[cfg.sampler.name]), cfg.sampler.options, f"{source}: sampler.options"
    )
    problems += _option_problems(
        getattr(optuna.pruners, _PRUNERS[cfg.pruner.name]), cfg.pruner.options, f"{source}: pruner.options"
    )
    if cfg.sampler.name == "cmaes" and importlib.util.find_spec("cmaes") is None:
        problems.append(f"{source}: sampler.name: cmaes needs the cmaes package; pip install cmaes")
    if cfg.pruner.name == "percentile" and "percentile" not in cfg.pruner.options:
        problems.append(f"{source}: pruner.options.percentile: required by the percentile pruner (e.g. 25.0)")
    if cfg.sampler.name == "grid":
        try:
            _grid(space, f"{source}: sampler")
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)


def build_sampler(cfg: StudyConfig, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded with the study's seed."""
    name, options = cfg.sampler.name, dict(cfg.sampler.options)
    cls = getattr(optuna.samplers, _SAMPLERS[name])
    if name in ("tpe", "gp"):
        options.setdefault("n_startup_trials", default_startup_trials(cfg.n_trials))
    if name == "grid":
        options["search_space"] = _grid(space, "sampler")
    try:
        return cls(seed=cfg.seed, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sampler.options: optuna's {cls.__name__} refused them: {e}") from None


def build_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """The configured pruner. Its steps are training examples seen."""
    name, options = cfg.pruner.name, dict(cfg.pruner.options)
    cls = getattr(optuna.pruners, _PRUNERS[name])
    if name in ("median", "percentile"):
        default = 5 if cfg.n_trials is None else max(2, min(5, cfg.n_trials // 5))
        options.setdefault("n_startup_trials", default)
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pruner.options: optuna's {cls.__name__} refused them: {e}") from None
