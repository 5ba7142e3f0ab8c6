"""Samplers and pruners built from the study config, seeded by the study; bad options refused by name."""

from __future__ import annotations

import copy
import importlib.util
import warnings
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from conftest import MINIMAL_STUDY as MINIMAL

from llmflow_hpo.config.study import StudyConfig, config_from_dict
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.search.spaces import SearchSpace, parse_search_space, suggest_params
from llmflow_hpo.search.startup import StartupDesign, design_points
from llmflow_hpo.search.strategy import (
    MetricFirst,
    PerTrialSeed,
    build_pruner,
    build_sampler,
    check_strategy,
    default_startup_trials,
    study_target,
    trial_seed,
)
from llmflow_hpo.study import records

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = parse_search_space(
    yaml.safe_load(
        "learning_rate: {type: float, low: 1.0e-5, high: 3.0e-4, log: true}\n"
        "weight_decay: {type: float, low: 0.0, high: 0.1}\n"
        "epochs: {type: int, low: 1, high: 4}\n"
    ),
    source="space.yaml",
)
GRID_SPACE = parse_search_space(
    yaml.safe_load(
        "batch_size: {type: categorical, choices: [8, 16]}\n"
        "epochs: {type: int, low: 1, high: 5, step: 2}\n"
        "warmup_ratio: {type: float, low: 0.0, high: 0.2, step: 0.1}\n"
    ),
    source="space.yaml",
)

HAS_CMAES = importlib.util.find_spec("cmaes") is not None
NEEDS_CMAES = pytest.mark.skipif(not HAS_CMAES, reason="optuna's CmaEsSampler needs the cmaes package")

SAMPLER_CLASSES = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "grid": optuna.samplers.GridSampler,
    "qmc": optuna.samplers.QMCSampler,
}
PRUNER_CASES = [
    ("median", {}, optuna.pruners.MedianPruner),
    ("percentile", {"percentile": 25.0}, optuna.pruners.PercentilePruner),
    ("successive-halving", {}, optuna.pruners.SuccessiveHalvingPruner),
    ("hyperband", {}, optuna.pruners.HyperbandPruner),
    ("none", {}, optuna.pruners.NopPruner),
]


def config(**top: Any) -> StudyConfig:
    raw = copy.deepcopy(MINIMAL)
    raw.update(top)
    return config_from_dict(raw, source="study.yaml")


def space_for(name: str) -> SearchSpace:
    return GRID_SPACE if name == "grid" else SPACE


def inner(sampler: optuna.samplers.BaseSampler) -> optuna.samplers.BaseSampler:
    """The optuna sampler itself (build_sampler wraps it in the start-up design, to seed it per trial and, in a
    quality-against-cost study, to rank by the metric)."""
    while isinstance(sampler, StartupDesign | PerTrialSeed | MetricFirst):
        sampler = sampler.inner
    return sampler


def core(pruner: optuna.pruners.BasePruner) -> optuna.pruners.BasePruner:
    """The configured pruner itself (pruner.patience wraps it in optuna's PatientPruner)."""
    return pruner._wrapped_pruner if isinstance(pruner, optuna.pruners.PatientPruner) else pruner  # type: ignore[attr-defined]


def first_params(sampler: optuna.samplers.BaseSampler, space: SearchSpace, n: int = 3) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=sampler)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning, independent-sampling notes
        for i in range(n):
            trial = study.ask()
            out.append(suggest_params(trial, space))
            study.tell(trial, float(i))
    return out


def problems(cfg: StudyConfig, space: SearchSpace = SPACE) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check_strategy(cfg, space, "study.yaml")
    return info.value.problems


# ----------------------------------------------------------------------------------------------------
# Samplers.


@pytest.mark.parametrize("name", list(SAMPLER_CLASSES))
def test_each_sampler_builds_its_optuna_class(name: str) -> None:
    cfg = config(sampler={"name": name})
    check_strategy(cfg, space_for(name), "study.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = build_sampler(cfg, space_for(name))
    assert isinstance(inner(sampler), SAMPLER_CLASSES[name])  # grid: StudyGrid, optuna's GridSampler ended by our loop


def sampling_names(names: list[str]) -> list[Any]:
    return [pytest.param(n, marks=NEEDS_CMAES) if n == "cmaes" else n for n in names]


@pytest.mark.parametrize("name", sampling_names(list(SAMPLER_CLASSES)))
def test_same_seed_proposes_the_same_params(name: str) -> None:
    cfg = config(sampler={"name": name}, seed=123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = first_params(build_sampler(cfg, space_for(name)), space_for(name))
        b = first_params(build_sampler(cfg, space_for(name)), space_for(name))
    assert a == b


@pytest.mark.parametrize("name", sampling_names(["tpe", "random", "cmaes", "gp"]))
def test_the_study_seed_is_what_seeds_the_sampler(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = first_params(build_sampler(config(sampler={"name": name}, seed=1), SPACE), SPACE, n=1)
        b = first_params(build_sampler(config(sampler={"name": name}, seed=2), SPACE), SPACE, n=1)
        c = first_params(optuna.samplers.RandomSampler(seed=trial_seed(1, 0)), SPACE, n=1)
    assert a != b
    if name == "random":
        assert a == c


@pytest.mark.parametrize(("n_trials", "expected"), [(None, 10), (1, 2), (8, 2), (10, 2), (12, 3), (20, 5), (100, 10)])
def test_default_startup_trials(n_trials: int | None, expected: int) -> None:
    assert default_startup_trials(n_trials) == expected


@pytest.mark.parametrize(("name", "n_trials", "expected"), [("tpe", 10, 2), ("tpe", 100, 10), ("gp", 20, 5)])
def test_random_startup_trials_follow_the_budget(name: str, n_trials: int, expected: int) -> None:
    sampler = build_sampler(config(sampler={"name": name, "startup": "random"}, n_trials=n_trials), SPACE)
    assert not isinstance(sampler, StartupDesign)
    assert inner(sampler)._n_startup_trials == expected  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["tpe", "gp"])
def test_after_the_design_the_sampler_models_at_once(name: str) -> None:
    sampler = build_sampler(config(sampler={"name": name}, n_trials=30), SPACE)  # the design is the default
    assert isinstance(sampler, StartupDesign) and sampler.length([]) == 4  # 3 dimensions + 1
    assert inner(sampler)._n_startup_trials == 0  # type: ignore[attr-defined]
    assert not isinstance(build_sampler(config(sampler={"name": "random"}), SPACE), StartupDesign)


def test_the_design_trials_come_first_then_the_sampler() -> None:
    cfg = config(sampler={"name": "tpe", "startup": "design", "startup_trials": 3}, n_trials=30)
    fixed = {"learning_rate": 5e-5, "weight_decay": 0.0, "epochs": 3}
    study = optuna.create_study(sampler=build_sampler(cfg, SPACE), direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.enqueue_trial(fixed, user_attrs={records.ORIGIN: "defaults"})  # queued first: not a design trial
        for _ in range(6):
            trial = study.ask()
            study.tell(trial, sum(suggest_params(trial, SPACE).values()))
    origins = [t.user_attrs.get(records.ORIGIN) for t in study.trials]
    assert origins == ["defaults", "design", "design", None, None, None]  # 3 strata, one taken by the fixed trial
    assert [t.params for t in study.trials[1:3]] == design_points(SPACE, 3, seed=cfg.seed, fixed=[fixed])  # in order


def test_user_startup_trials_are_kept() -> None:
    cfg = config(sampler={"name": "tpe", "options": {"n_startup_trials": 7}}, n_trials=100)
    check_strategy(cfg, SPACE, "study.yaml")
    assert inner(build_sampler(cfg, SPACE))._n_startup_trials == 7  # type: ignore[attr-defined]
    assert cfg.sampler.options == {"n_startup_trials": 7}  # the config is not changed


def test_tpe_is_multivariate_with_the_constant_liar_whatever_optunas_own_defaults() -> None:
    # optuna 4 defaults to independent TPE without the liar, optuna 5 to both: the benchmarked policy is stated.
    single = inner(build_sampler(config(sampler={"name": "tpe"}), SPACE))
    assert (single._multivariate, single._constant_liar) == (True, True)  # type: ignore[attr-defined]
    cost = config(sampler={"name": "tpe"}, objective={"cost": "params"})
    assert len(cost.directions) == 2  # two objectives: optuna's own rule, independent TPE
    assert inner(build_sampler(cost, SPACE))._multivariate is False  # type: ignore[attr-defined]
    mine = inner(build_sampler(config(sampler={"name": "tpe", "options": {"multivariate": False}}), SPACE))
    assert (mine._multivariate, mine._constant_liar) == (False, True)  # type: ignore[attr-defined]
    # Multivariate TPE samples other points than independent TPE once it models (after the design).
    joint = build_sampler(config(sampler={"name": "tpe"}, n_trials=12), SPACE)
    independent = build_sampler(config(sampler={"name": "tpe", "options": {"multivariate": False}}, n_trials=12), SPACE)
    assert first_params(joint, SPACE, n=8) != first_params(independent, SPACE, n=8)


def test_sampler_options_reach_optuna() -> None:
    cfg = config(sampler={"name": "tpe", "options": {"n_ei_candidates": 5, "multivariate": True}})
    check_strategy(cfg, SPACE, "study.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = build_sampler(cfg, SPACE)
    assert inner(sampler)._n_ei_candidates == 5  # type: ignore[attr-defined]
    assert inner(sampler)._multivariate is True  # type: ignore[attr-defined]


def test_grid_covers_categorical_int_and_stepped_float() -> None:
    """Through the worker loop (which tells outside Study.optimize, where GridSampler's study.stop() raised)."""
    from llmflow_hpo.search.backends.optuna_backend import run_worker

    cfg = config(sampler={"name": "grid"}, n_trials=50)
    study = optuna.create_study(sampler=build_sampler(cfg, GRID_SPACE))
    lines: list[str] = []
    target = study_target(cfg, GRID_SPACE)
    ran = run_worker(
        study,
        lambda t: float(suggest_params(t, GRID_SPACE)["epochs"]),
        target=target,
        draw=lambda t: suggest_params(t, GRID_SPACE),
        log=lines.append,
    )
    seen = {(t.params["batch_size"], t.params["epochs"], round(t.params["warmup_ratio"], 9)) for t in study.trials}
    assert target == ran == len(study.trials) == 2 * 3 * 3  # n_trials=50 capped at the grid's size
    assert seen == {(b, e, w) for b in (8, 16) for e in (1, 3, 5) for w in (0.0, 0.1, 0.2)}
    assert lines == [
        f"study {study.study_name}: the grid is done, each of its 18 point(s) has run; no new trial started"
    ]


def test_a_grid_point_that_failed_is_not_run_again() -> None:
    """A point that failed for good is done for the grid: the study ends short of its target, no point twice."""
    from llmflow_hpo.errors import TrialFailure
    from llmflow_hpo.search.backends.optuna_backend import run_worker

    cfg = config(sampler={"name": "grid"})  # no n_trials: the grid once
    study = optuna.create_study(sampler=build_sampler(cfg, GRID_SPACE))

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, GRID_SPACE)
        if trial.number == 3:
            raise TrialFailure("diverged")
        return float(params["epochs"])

    lines: list[str] = []
    ran = run_worker(study, objective, target=study_target(cfg, GRID_SPACE), log=lines.append)
    points = [(t.params["batch_size"], t.params["epochs"], round(t.params["warmup_ratio"], 9)) for t in study.trials]
    assert ran == 18 and len(set(points)) == 18
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.FAIL) == 1
    assert len(lines) == 1 and "the grid is done" in lines[0]


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("learning_rate: {type: float, low: 1.0e-5, high: 3.0e-4, log: true}", "learning_rate"),
        ("weight_decay: {type: float, low: 0.0, high: 0.1}", "weight_decay"),
        ("batch_size: {type: int, low: 8, high: 64, log: true}", "batch_size"),
    ],
)
def test_grid_refuses_continuous_parameters(text: str, name: str) -> None:
    space = parse_search_space(yaml.safe_load("epochs: {type: int, low: 1, high: 3}\n" + text), source="s")
    cfg = config(sampler={"name": "grid"})
    found = problems(cfg, space)
    assert len(found) == 1
    assert found[0].startswith("study.yaml: sampler: grid sampling needs ")
    assert f" {name} " in found[0]
    with pytest.raises(ConfigError, match=f"grid sampling needs {name} "):
        build_sampler(cfg, space)


def test_unknown_sampler_option_is_named() -> None:
    found = problems(config(sampler={"name": "tpe", "options": {"n_startup": 3}}))
    assert len(found) == 1
    assert found[0].startswith("study.yaml: sampler.options.n_startup: not an option of optuna's TPESampler")
    assert "n_startup_trials" in found[0]  # the accepted options are listed


@pytest.mark.parametrize("name", ["random", "cmaes", "qmc"])
def test_options_are_checked_against_each_samplers_own_signature(name: str) -> None:
    found = problems(config(sampler={"name": name, "options": {"n_ei_candidates": 3}}))
    cls_name = SAMPLER_CLASSES[name].__name__
    assert len(found) == 1
    assert found[0].startswith(f"study.yaml: sampler.options.n_ei_candidates: not an option of optuna's {cls_name}")


@pytest.mark.parametrize(("name", "option"), [("random", "seed"), ("tpe", "seed"), ("grid", "search_space")])
def test_reserved_sampler_options_are_refused(name: str, option: str) -> None:
    found = problems(config(sampler={"name": name, "options": {option: 1}}), space_for(name))
    assert found == [
        f"study.yaml: sampler.options.{option}: set by llmflow-hpo (from the study's seed / search space); remove it"
    ]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_sampler_values_optuna_refuses_become_config_errors() -> None:
    cfg = config(sampler={"name": "qmc", "options": {"qmc_type": "nonsense"}})
    with pytest.raises(ConfigError, match=r"study\.yaml: sampler\.options: optuna's QMCSampler refused them"):
        check_strategy(cfg, SPACE, "study.yaml")  # validate asks optuna's constructor too, before any study
    with pytest.raises(ConfigError, match=r"sampler\.options: optuna's QMCSampler refused them"):
        build_sampler(cfg, SPACE)


@pytest.mark.parametrize(
    ("section", "name", "options", "expected"),
    [
        ("sampler", "tpe", {"n_startup_trials": -3}, "sampler.options.n_startup_trials: must be >= 0, got -3"),
        ("sampler", "tpe", {"n_startup_trials": "five"}, "sampler.options.n_startup_trials: expected an integer"),
        ("sampler", "tpe", {"n_startup_trials": 2.5}, "sampler.options.n_startup_trials: expected an integer"),
        ("sampler", "tpe", {"multivariate": "yes"}, "sampler.options.multivariate: expected true or false"),
        ("sampler", "tpe", {"gamma": 0.25}, "sampler.options.gamma: takes a Python object"),
        ("sampler", "tpe", {"n_ei_candidates": 0}, "sampler.options.n_ei_candidates: must be >= 1"),
        ("pruner", "median", {"n_warmup_steps": -5}, "pruner.options.n_warmup_steps: must be >= 0"),
        ("pruner", "median", {"n_startup_trials": "5"}, "pruner.options.n_startup_trials: expected an integer"),
        ("pruner", "percentile", {"percentile": 150}, "pruner.options.percentile: must be in [0, 100], got 150"),
        ("pruner", "hyperband", {"reduction_factor": 1}, "pruner.options.reduction_factor: must be >= 2"),
        ("pruner", "successive-halving", {"min_resource": "x"}, "pruner.options.min_resource: must be >= 1 or 'auto'"),
    ],
)
def test_option_types_and_ranges_are_checked_before_any_study(
    section: str, name: str, options: dict[str, Any], expected: str
) -> None:
    """optuna's TPESampler takes n_startup_trials=-3 or "five" without a word and fails (or misbehaves) mid-study."""
    found = problems(config(**{section: {"name": name, "options": options}}))
    assert len(found) == 1, found
    assert found[0].startswith(f"study.yaml: {expected}"), found


@pytest.mark.skipif(HAS_CMAES, reason="the cmaes package is installed here")
def test_cmaes_without_its_package_is_refused_at_validation() -> None:
    with pytest.raises(ConfigError, match="cmaes"):
        check_strategy(config(sampler={"name": "cmaes"}), SPACE, "study.yaml")


# ----------------------------------------------------------------------------------------------------
# Pruners.


@pytest.mark.parametrize(("name", "options", "cls"), PRUNER_CASES)
def test_each_pruner_builds_its_optuna_class(name: str, options: dict[str, Any], cls: type) -> None:
    cfg = config(pruner={"name": name, "options": options})
    check_strategy(cfg, SPACE, "study.yaml")
    assert type(core(build_pruner(cfg))) is cls
    assert type(build_pruner(cfg)) is (cls if name == "none" else optuna.pruners.PatientPruner)  # patience 1
    assert type(build_pruner(config(pruner={"name": name, "options": options, "patience": None}))) is cls


def test_median_startup_trials_follow_the_budget_and_user_values_are_kept() -> None:
    assert core(build_pruner(config(n_trials=20)))._n_startup_trials == 4  # type: ignore[attr-defined]
    assert core(build_pruner(config(n_trials=100)))._n_startup_trials == 5  # type: ignore[attr-defined]
    assert core(build_pruner(config(n_trials=None, timeout=60)))._n_startup_trials == 5  # type: ignore[attr-defined]
    kept = core(build_pruner(config(pruner={"options": {"n_startup_trials": 1, "n_warmup_steps": 500}})))
    assert kept._n_startup_trials == 1  # type: ignore[attr-defined]
    assert kept._n_warmup_steps == 500  # type: ignore[attr-defined]
    assert core(build_pruner(config(), n_train=48))._n_warmup_steps == 48  # type: ignore[attr-defined]  # one epoch
    kept = core(build_pruner(config(pruner={"options": {"n_warmup_steps": 0}}), n_train=48))
    assert kept._n_warmup_steps == 0  # type: ignore[attr-defined]


def _synthetic_study(pruner: optuna.pruners.BasePruner, steps: list[int], n: int = 40) -> optuna.Study:
    """``n`` trials whose dev metric rises with the examples seen, reported at ``steps`` through ``pruner``."""
    rng = np.random.default_rng(0)
    study = optuna.create_study(direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        trial = study.ask()
        quality = trial.suggest_float("quality", 0.5, 1.0)
        for step in steps:
            trial.report(quality * (1 - 0.5 ** (step / steps[0])) + rng.normal(0, 0.02), step)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, quality)
    return study


@pytest.mark.parametrize("name", ["successive-halving", "hyperband"])
def test_halving_pruners_count_their_rungs_in_examples_seen(name: str) -> None:
    """Steps are examples seen: with optuna's min_resource (1, or SH's 1% of a run) every rung below the first
    evaluation was judged at that evaluation at once, so a trial had to be the top 1/reduction_factor**k there."""
    cfg = config(pruner={"name": name}, train={"epochs": 3, "evals_per_epoch": 2})
    pruner = core(build_pruner(cfg, n_train=1000))
    assert pruner._min_resource == 500  # type: ignore[attr-defined]  # the first evaluation: 1000 examples / 2
    if name == "hyperband":
        assert pruner._max_resource == 3000  # type: ignore[attr-defined]  # the longest run: 3 epochs
        longer = core(build_pruner(cfg, n_train=1000, space=SPACE))  # epochs searched up to 4
        assert longer._max_resource == 4000  # type: ignore[attr-defined]
    kept = core(build_pruner(config(pruner={"name": name, "options": {"min_resource": 7}}), n_train=1000))
    assert kept._min_resource == 7  # type: ignore[attr-defined]
    study = _synthetic_study(pruner, steps=[500 * k for k in range(1, 7)])
    # One rung (or none, in hyperband's later brackets) is judged at the first evaluation, never several.
    at_first = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED and t.last_step == 500]
    assert at_first and all(sum(k.startswith("completed_rung_") for k in t.system_attrs) == 1 for t in at_first)


def test_percentile_pruner_needs_percentile() -> None:
    cfg = config(pruner={"name": "percentile"})
    assert problems(cfg) == ["study.yaml: pruner.options.percentile: required by the percentile pruner (e.g. 25.0)"]
    with pytest.raises(ConfigError, match="PercentilePruner refused them"):
        build_pruner(cfg)


@pytest.mark.parametrize(
    ("name", "option", "cls_name"),
    [
        ("median", "n_warmup", "MedianPruner"),
        ("hyperband", "n_startup_trials", "HyperbandPruner"),
        ("successive-halving", "max_resource", "SuccessiveHalvingPruner"),
        ("none", "n_startup_trials", "NopPruner"),
    ],
)
def test_unknown_pruner_option_is_named(name: str, option: str, cls_name: str) -> None:
    found = problems(config(pruner={"name": name, "options": {option: 1}}))
    assert len(found) == 1
    assert found[0].startswith(f"study.yaml: pruner.options.{option}: not an option of optuna's {cls_name}")


def test_sampler_and_pruner_problems_are_reported_together() -> None:
    cfg = config(
        sampler={"name": "grid", "options": {"seed": 1, "bogus": 2}},
        pruner={"name": "percentile", "options": {"n_warmup": 3}},
    )
    found = problems(cfg)
    # seed, bogus, n_warmup, percentile missing, and grid over learning_rate (log) and weight_decay (no step)
    assert len(found) == 6
    assert any("sampler.options.seed" in p for p in found)
    assert any("sampler.options.bogus" in p for p in found)
    assert any("pruner.options.n_warmup" in p for p in found)
    assert any("pruner.options.percentile" in p for p in found)
    assert any("grid sampling needs" in p for p in found)
