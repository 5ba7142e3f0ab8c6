"""Ray Tune schedulers and domains: the study's ``ray.scheduler`` section and search space in Ray's terms.

``scheduler_problems`` is the one rule set for the scheduler options: ``build_scheduler`` applies it before
it builds the scheduler, and ``validate`` (``strategy.check_strategy``) applies it without building one.
Importing this module imports Ray's schedulers and Tune's domains, which import neither torch nor
transformers.
"""

from __future__ import annotations

import inspect
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray import tune

from llmflow_hpo.config.hyperparameters import HYPERPARAMETERS
from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.search.schedule import first_evaluation_step, longest_epochs
from llmflow_hpo.search.spaces import SearchSpace, stepped_values

__all__ = [
    "EVALUATION",
    "PBT_MUTABLE",
    "STEP",
    "build_scheduler",
    "metric_key",
    "scheduler_problems",
    "tune_domain",
]

STEP = "step"  # the result key the schedulers count time in: training examples seen
EVALUATION = "evaluation"  # the evaluation point's number (1, 2, ...): HyperBand's time, see build_scheduler
# Hyperparameters PBT may change in a running trial (declared ``mutable`` in config/hyperparameters.py: they
# change neither the model's shape, the optimizer's kind nor the length of the run).
PBT_MUTABLE = tuple(name for name, hp in HYPERPARAMETERS.items() if hp.mutable)
_SCHEDULERS = {
    "asha": "ASHAScheduler",
    "hyperband": "HyperBandScheduler",
    "median": "MedianStoppingRule",
    "pbt": "PopulationBasedTraining",
}
_RESERVED = {"time_attr", "metric", "mode", "hyperparam_mutations"}


def metric_key(cfg: StudyConfig) -> str:
    """The result key a trial reports the study's dev metric under (the schedulers' metric)."""
    return f"dev_{cfg.metric}"


def tune_domain(dist: Any) -> Any:
    """An optuna distribution as a Ray Tune domain (for PBT, which samples and mutates by itself)."""
    if isinstance(dist, CategoricalDistribution):
        return tune.choice(list(dist.choices))
    if isinstance(dist, IntDistribution):
        if dist.log:
            return tune.lograndint(dist.low, dist.high + 1)
        return tune.qrandint(dist.low, dist.high, dist.step) if dist.step > 1 else tune.randint(dist.low, dist.high + 1)
    if isinstance(dist, FloatDistribution):
        if dist.step is not None:
            # optuna's points low + k * step (tune.quniform rounds to multiples of step instead), each as likely
            return tune.choice(stepped_values(dist))
        return tune.loguniform(dist.low, dist.high) if dist.log else tune.uniform(dist.low, dist.high)
    raise TypeError(f"unsupported distribution {dist!r}")  # pragma: no cover - spaces makes only these


def _mutation(dist: Any) -> Any:
    """What PBT may change a parameter to: a list of values (choices, a float's steps), which PBT shifts to a
    neighbour or resamples; else the domain, whose value PBT multiplies by 0.8 or 1.2 (it would leave the
    grid of a stepped float, and fail on a choice of strings)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        return stepped_values(dist)
    return tune_domain(dist)


def _scheduler_class(name: str) -> type:
    from ray.tune import schedulers

    return getattr(schedulers, _SCHEDULERS[name])


def scheduler_problems(cfg: StudyConfig, space: SearchSpace, source: str) -> list[str]:
    """What is wrong with the scheduler's options, each naming its field: an option Ray's scheduler does not
    take, one llmflow-hpo sets itself, PBT over a space with nothing it may mutate. Empty for ``none``."""
    name = cfg.ray.scheduler
    if name == "none":
        return []
    cls = _scheduler_class(name)
    accepted = {n for n in inspect.signature(cls.__init__).parameters if n != "self"} - _RESERVED
    problems = [
        f"{source}: ray.scheduler_options.{k}: "
        + (
            "set by llmflow-hpo; remove it"
            if k in _RESERVED
            else f"not an option of Ray's {cls.__name__}; accepted: {', '.join(sorted(accepted))}"
        )
        for k in cfg.ray.scheduler_options
        if k not in accepted
    ]
    if name == "pbt" and not any(k in PBT_MUTABLE for k in space):
        problems.append(
            f"{source}: ray.scheduler: pbt mutates {', '.join(PBT_MUTABLE)}; the search space has none of them"
        )
    return problems


def build_scheduler(cfg: StudyConfig, space: SearchSpace, n_train: int, source: str) -> Any:
    """The configured Ray scheduler, its times in training examples seen; None for ``none``.

    Defaults follow the optuna backend's evaluation schedule: the first evaluation point is the grace
    period, the longest run (the most epochs the space allows) is ``max_t``. HyperBand has no grace
    period (its smallest budget is one time unit), so it counts evaluations instead of examples.
    """
    name = cfg.ray.scheduler
    if name == "none":
        return None
    problems = scheduler_problems(cfg, space, source)
    if problems:
        raise ConfigError(problems)
    cls = _scheduler_class(name)
    options = dict(cfg.ray.scheduler_options)
    interval = first_evaluation_step(cfg, n_train)  # the first evaluation point: examples between two of them
    max_epochs = longest_epochs(cfg, space)
    # max_t lies one example past the last evaluation: a run that reaches its end is not stopped there,
    # so it still reports its costs (train time, throughput) after its last evaluation.
    max_t = max_epochs * n_train + 1
    if name == "asha":
        options.setdefault("max_t", max_t)
        options.setdefault("grace_period", interval)
        options.setdefault("reduction_factor", 3)
    elif name == "hyperband":
        options.setdefault("max_t", max_epochs * cfg.train.evals_per_epoch + 1)
    elif name == "median":
        options.setdefault("grace_period", interval)
        options.setdefault("min_samples_required", 3)
    elif name == "pbt":
        options["hyperparam_mutations"] = {k: _mutation(d) for k, d in space.items() if k in PBT_MUTABLE}
        options.setdefault("perturbation_interval", 2 * interval)
    try:
        return cls(time_attr=EVALUATION if name == "hyperband" else STEP, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: ray.scheduler_options: Ray's {cls.__name__} refused them: {e}") from None
