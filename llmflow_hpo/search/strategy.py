"""Samplers and pruners: the study config's ``sampler`` and ``pruner`` sections become optuna objects.

Options are checked against the optuna constructors' own signatures, so a misspelt option is a config
error that names it, not a TypeError deep in a run.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.search.schedule import first_evaluation_step, longest_epochs
from llmflow_hpo.search.spaces import SearchSpace, stepped_values
from llmflow_hpo.search.startup import StartupDesign
from llmflow_hpo.study.front import COST_ATTRIBUTES, CostConstraint
from llmflow_hpo.study.optuna_private import MetricDirection

__all__ = [
    "MetricFirst",
    "PerTrialSeed",
    "StudyGrid",
    "build_pruner",
    "build_sampler",
    "check_strategy",
    "default_startup_trials",
    "study_target",
    "trial_seed",
]

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
# The samplers that model the trials so far, after a start-up phase (search.startup's design).
_MODEL_BASED = ("tpe", "gp", "cmaes")
# Set by llmflow-hpo itself, not by the user.
_RESERVED = {"seed", "search_space"}


def default_startup_trials(n_trials: int | None) -> int:
    """Random start-up trials for TPE/GP: a quarter of the budget, at least 2, at most 10.

    optuna's fixed default of 10 turns a 10-trial "TPE" study into a random search.
    """
    if n_trials is None:
        return 10
    return max(2, min(10, n_trials // 4))


# Ranges of the options optuna takes on trust in its constructors (a bad value fails later, mid-study).
_OPTION_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n_startup_trials": (lambda v: v >= 0, "must be >= 0"),
    "n_warmup_steps": (lambda v: v >= 0, "must be >= 0 (training examples seen)"),
    "interval_steps": (lambda v: v >= 1, "must be >= 1"),
    "n_min_trials": (lambda v: v >= 1, "must be >= 1"),
    "percentile": (lambda v: 0 <= v <= 100, "must be in [0, 100]"),
    "n_ei_candidates": (lambda v: v >= 1, "must be >= 1"),
    "prior_weight": (lambda v: v is None or v > 0, "must be > 0 or null"),
    "sigma0": (lambda v: v is None or v > 0, "must be > 0 or null"),
    "popsize": (lambda v: v is None or v >= 1, "must be >= 1 or null"),
    "reduction_factor": (lambda v: v >= 2, "must be >= 2"),
    "min_early_stopping_rate": (lambda v: v >= 0, "must be >= 0"),
    "bootstrap_count": (lambda v: v >= 0, "must be >= 0"),
    "min_resource": (lambda v: v == "auto" or (not isinstance(v, str) and v >= 1), "must be >= 1 or 'auto'"),
    "max_resource": (lambda v: v == "auto" or (not isinstance(v, str) and v >= 1), "must be >= 1 or 'auto'"),
}
_YAML_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "None": (type(None),),
    "dict": (dict,),
    "list": (list,),
}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "None": "null"}


def _annotation_types(annotation: Any) -> list[str] | None:
    """The YAML-expressible types of an optuna parameter annotation (``'int | None'``), or None when unknown."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None)
    if not isinstance(text, str):
        return None
    parts, depth, current = [], 0, ""
    for char in text:  # split on the top-level "|" only (not inside Callable[[int], int | None])
        depth += char == "["
        depth -= char == "]"
        if char == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [part.split("[")[0].replace("Mapping", "dict").replace("Sequence", "list") for part in parts]


def _value_problem(name: str, annotation: Any, value: Any) -> str | None:
    """Why ``value`` (read from YAML) cannot be optuna's option ``name`` of that annotation, or None."""
    types = _annotation_types(annotation)
    if types is None:
        return None
    allowed = [t for t in types if t in _YAML_TYPES]
    if value is not None and not [t for t in allowed if t != "None"]:
        return f"takes a Python object ({annotation}), which a YAML config cannot give; remove it"
    if value is None:
        ok = "None" in allowed
    elif isinstance(value, bool):
        ok = "bool" in allowed
    else:
        ok = any(isinstance(value, _YAML_TYPES[t]) for t in allowed if t not in ("bool", "None"))
    if not ok:
        words = [_TYPE_WORDS.get(t, f"a {t}") for t in allowed]
        return f"expected {' or '.join(words)}, got {value!r}"
    if name in _OPTION_RANGES and value is not None:
        check, message = _OPTION_RANGES[name]
        if not check(value):
            return f"{message}, got {value!r}"
    return None


def _option_problems(cls: type, options: dict[str, Any], where: str) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    accepted = {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    problems = []
    for key in options:
        if key in _RESERVED:
            problems.append(f"{where}.{key}: set by llmflow-hpo (from the study's seed / search space); remove it")
        elif key not in accepted:
            names = sorted(accepted - _RESERVED)
            takes = f"accepted: {', '.join(names)}" if names else f"it takes none; remove {where.rsplit(': ', 1)[-1]}"
            problems.append(f"{where}.{key}: not an option of optuna's {cls.__name__}; {takes}")
        else:
            why = _value_problem(key, params[key].annotation, options[key])
            if why:
                problems.append(f"{where}.{key}: {why} (an option of optuna's {cls.__name__})")
    return problems


def _construct_problems(cls: type, options: dict[str, Any], where: str) -> list[str]:
    """What optuna's own constructor says of the options (it checks some values itself); no torch import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(**options)
    except (TypeError, ValueError) as e:
        return [f"{where}: optuna's {cls.__name__} refused them: {e}"]
    return []


def _grid(space: SearchSpace, where: str) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    problems = []
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            grid[name] = stepped_values(dist)
        else:
            problems.append(
                f"{where}: grid sampling needs {name} to be categorical, a linear int, or a float with step; "
                "give it choices or a step"
            )
    if problems:
        raise ConfigError(problems)
    return grid


def grid_size(space: SearchSpace) -> int:
    """The number of points of the grid sampler's grid over ``space``."""
    return math.prod(len(values) for values in _grid(space, "sampler").values())


def study_target(cfg: StudyConfig, space: SearchSpace) -> int | None:
    """The finished trials a study aims at: ``n_trials``, at most the grid's size for the grid sampler.

    None: no count (a timeout ends the study). A grid study without ``n_trials`` runs its grid once.
    """
    if cfg.sampler.name != "grid":
        return cfg.n_trials
    size = grid_size(space)
    return size if cfg.n_trials is None else min(cfg.n_trials, size)


class StudyGrid(optuna.samplers.GridSampler):
    """optuna's GridSampler, ended by the worker loop instead of ``study.stop()``.

    ``GridSampler.after_trial`` calls ``study.stop()`` once every point has run, which works only inside
    ``Study.optimize``; our workers tell their trials outside it, where it raises RuntimeError. The worker
    loop counts the grid's size as the study's target (``study_target``), asks for a trial only while a
    point is left (``points_left``) and ends when optuna's ``is_exhausted`` says every point has run.
    """

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        pass

    @property
    def size(self) -> int:
        return len(self._all_grids)

    def done_line(self, study_name: str) -> str:
        return f"study {study_name}: the grid is done, each of its {self.size} point(s) has run"

    def points_left(self, trials: list[FrozenTrial]) -> int:
        """Grid points that none of the study's ``trials`` has taken yet (finished, running, or queued)."""
        taken = {
            t.system_attrs["grid_id"]
            for t in trials
            if "grid_id" in t.system_attrs and self._same_search_space(t.system_attrs["search_space"])
        }
        return self.size - len(taken)


def check_strategy(cfg: StudyConfig, space: SearchSpace, source: str) -> None:
    """Raise ConfigError for sampler/pruner options optuna would refuse (no sampler is built), and for a Ray
    study the scheduler options Ray would refuse (checked only where Ray is installed)."""
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
    if not problems:  # the values optuna's constructors check themselves (grid and cmaes need more than options)
        if cfg.sampler.name not in ("grid", "cmaes"):
            sampler_cls = getattr(optuna.samplers, _SAMPLERS[cfg.sampler.name])
            problems += _construct_problems(sampler_cls, cfg.sampler.options, f"{source}: sampler.options")
        pruner_cls = getattr(optuna.pruners, _PRUNERS[cfg.pruner.name])
        problems += _construct_problems(pruner_cls, cfg.pruner.options, f"{source}: pruner.options")
    if cfg.backend == "ray":
        problems += _ray_scheduler_problems(cfg, space, source)
    if problems:
        raise ConfigError(problems)


def _ray_scheduler_problems(cfg: StudyConfig, space: SearchSpace, source: str) -> list[str]:
    """The Ray scheduler's options, by the rules ``build_scheduler`` applies, when Ray is installed (without
    it, validate says so itself). Ray's schedulers import neither torch nor transformers."""
    from llmflow_hpo.search.backends.ray_backend import ray_environment, ray_missing

    if ray_missing():
        return []
    ray_environment(local=cfg.ray.address is None)  # before Ray's first import: it reads them then
    from llmflow_hpo.search.backends.ray_backend.schedulers import scheduler_problems

    return scheduler_problems(cfg, space, source)


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number``: independent streams per trial, the same on every rerun."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class PerTrialSeed(optuna.samplers.BaseSampler):
    """The configured sampler, seeded again before each trial from (study seed, trial number).

    A sampler seeded once per process replays its random draws in every process: the first trial a
    rerun (or a second worker) samples would repeat the first trial of the first run. optuna's samplers
    read the study's history from the storage, so building one per trial loses nothing but that replay.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    @property
    def inner(self) -> optuna.samplers.BaseSampler:
        return self._inner

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: Any, values: Any) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


class MetricFirst(optuna.samplers.BaseSampler):
    """A quality-against-cost study's TPE, handed the study as ``optuna_private.MetricDirection``: its pruned
    trials, ranked by their metric (their intermediate values), in the metric's direction."""

    def __init__(self, inner: optuna.samplers.BaseSampler) -> None:
        self._inner = inner

    @property
    def inner(self) -> optuna.samplers.BaseSampler:
        return self._inner

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner.before_trial(MetricDirection(study), trial)  # type: ignore[arg-type]

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(MetricDirection(study), trial)  # type: ignore[arg-type]

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(MetricDirection(study), trial, search_space)  # type: ignore[arg-type]

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._inner.sample_independent(MetricDirection(study), trial, param_name, param_distribution)  # type: ignore[arg-type]

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: Any, values: Any) -> None:
        self._inner.after_trial(MetricDirection(study), trial, state, values)  # type: ignore[arg-type]

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


class _SamplerFactory:
    """Builds the configured sampler for a seed; a class, not a closure, so a sampler pickles (Ray saves it)."""

    def __init__(self, cls: type, options: dict[str, Any]) -> None:
        self.cls, self.options = cls, options

    def __call__(self, seed: int) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():  # GP and QMC are "experimental" in optuna; one warning per trial is noise
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # max_cost (CostConstraint): optuna 5 deprecates constraints_func for Trial.set_constraint, which
            # optuna 4 (pyproject's floor) lacks; the user can do nothing about the warning
            warnings.filterwarnings("ignore", "`constraints_func` has been deprecated", FutureWarning)
            return self.cls(seed=seed, **self.options)


def build_sampler(cfg: StudyConfig, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded per trial from the study's seed (QMC and grid: once)."""
    name, options = cfg.sampler.name, dict(cfg.sampler.options)
    cls = getattr(optuna.samplers, _SAMPLERS[name])
    if name in ("tpe", "gp"):
        # After the design, the sampler models at once; without it, its own random start-up trials.
        options.setdefault("n_startup_trials", 0 if _designed(cfg) else default_startup_trials(cfg.n_trials))
    if name == "tpe":
        # optuna 5's TPE, stated so that optuna 4 (pyproject's floor: independent TPE, no liar) runs the same
        # policy: multivariate for one objective (group needs it) and the constant liar, which several workers
        # need; measured on the policy benchmark (benchmarks/README.md, rounds 6 and 7).
        options.setdefault("multivariate", bool(options.get("group")) or len(cfg.directions) == 1)
        options.setdefault("constant_liar", True)
    if name == "grid":
        options["search_space"] = _grid(space, "sampler")
    cost = cfg.objective.cost
    if cost is not None and cfg.objective.max_cost is not None and name in ("tpe", "gp"):
        # max_cost as optuna's constraint: the sampler models feasibility; optuna stores each trial's value.
        options["constraints_func"] = CostConstraint(COST_ATTRIBUTES[cost], cfg.objective.max_cost)

    make = _SamplerFactory(StudyGrid if name == "grid" else cls, options)
    try:
        # QMC and grid number their points by the seed and find the next unvisited one from the storage:
        # one seed for the whole study, and no replay.
        sampler = make(cfg.seed) if name in ("qmc", "grid") else PerTrialSeed(make, cfg.seed)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sampler.options: optuna's {cls.__name__} refused them: {e}") from None
    if cost is not None and name == "tpe":
        sampler = MetricFirst(sampler)  # it ranks pruned trials in study.direction, which a cost study refuses
    if not _designed(cfg):
        return sampler
    return StartupDesign(
        sampler,
        space,
        seed=cfg.seed,
        length=cfg.sampler.startup_trials,
        n_trials=cfg.n_trials,
        budget_s=cfg.budget_s,
    )


def _designed(cfg: StudyConfig) -> bool:
    """Whether the sampler starts with the start-up design (``search.startup``): a model-based sampler's."""
    return cfg.sampler.startup == "design" and cfg.sampler.name in _MODEL_BASED


def build_pruner(
    cfg: StudyConfig, n_train: int | None = None, space: SearchSpace | None = None
) -> optuna.pruners.BasePruner:
    """The configured pruner. Its steps are training examples seen.

    median and percentile: ``n_warmup_steps`` defaults to one epoch (``n_train`` examples): in the
    first epoch the dev metric mostly says how far the learning-rate warmup has got, and a trial with a
    longer warmup would be pruned for it (benchmarks/README.md, peers.py).

    successive-halving and hyperband: ``min_resource`` defaults to the first evaluation point (optuna's
    1, or SH's "auto" estimate of 1% of a run, lies below it: every rung under the first evaluation would
    be judged at once there); hyperband's ``max_resource`` to the longest run the space allows.

    ``pruner.patience``: wrapped in optuna's PatientPruner, which asks the pruner only about a trial whose
    last ``patience + 1`` evaluations are all below its best before them: a trial still climbing (out of the
    phase where every trial predicts the majority class) is not pruned for being behind.
    """
    name, options = cfg.pruner.name, dict(cfg.pruner.options)
    cls = getattr(optuna.pruners, _PRUNERS[name])
    if name in ("median", "percentile"):
        default = 5 if cfg.n_trials is None else max(2, min(5, cfg.n_trials // 5))
        options.setdefault("n_startup_trials", default)
        if n_train is not None:
            options.setdefault("n_warmup_steps", n_train)
    if name in ("successive-halving", "hyperband") and n_train is not None:
        options.setdefault("min_resource", first_evaluation_step(cfg, n_train))
        if name == "hyperband":
            options.setdefault("max_resource", longest_epochs(cfg, space) * n_train)
    try:
        pruner = cls(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pruner.options: optuna's {cls.__name__} refused them: {e}") from None
    if cfg.pruner.patience is None or name == "none":
        return pruner
    with warnings.catch_warnings():  # "experimental" in optuna since 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.PatientPruner(pruner, patience=cfg.pruner.patience)
