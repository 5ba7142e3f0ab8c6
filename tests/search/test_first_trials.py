"""The trials a study starts with: the recipe's defaults, the start-up design, a warm start; and the budget."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import NER_CONFIG, deep_update
from optuna.trial import TrialState

from llmflow_hpo.config.study import config_from_dict, duration_seconds
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.search.budget import Budget
from llmflow_hpo.search.first_trials import default_params, project, queue_first_trials, warm_start_params
from llmflow_hpo.search.spaces import parse_search_space, suggest_params
from llmflow_hpo.search.startup import StartupDesign, design_length, design_points
from llmflow_hpo.study import records

SPACE = parse_search_space(
    {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 3e-4, "log": True},
        "batch_size": {"type": "categorical", "choices": [8, 16, 32]},
        "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.05},
        "epochs": {"type": "int", "low": 2, "high": 4},
        "scheduler": {"type": "categorical", "choices": ["cosine", "constant_with_warmup"]},
    },
    source="space.yaml",
)


def test_a_default_is_projected_into_the_space() -> None:
    assert project(5e-5, SPACE["learning_rate"]) == 5e-5
    assert project(1e-3, SPACE["learning_rate"]) == 3e-4  # clipped
    assert project(24, SPACE["batch_size"]) == 16  # nearest choice; a tie takes the smaller
    assert project(64, SPACE["batch_size"]) == 32
    assert project(0.07, SPACE["warmup_ratio"]) == pytest.approx(0.05)  # on the step
    assert project(1, SPACE["epochs"]) == 2
    assert project("linear", SPACE["scheduler"]) == "cosine"  # not a choice, not a number: the first


def test_the_defaults_trial_is_the_train_sections_values() -> None:
    cfg = config_from_dict(deep_update(NER_CONFIG, {"train": {"learning_rate": 1e-4, "batch_size": 32}}), source="x")
    params = default_params(cfg, SPACE)
    assert params == {"learning_rate": 1e-4, "batch_size": 32, "warmup_ratio": 0.0, "epochs": 2, "scheduler": "cosine"}


def test_no_defaults_trial_when_every_searched_default_is_null(tiny_cfg, tmp_path: Path) -> None:
    space_raw = {"hidden_dropout": {"type": "float", "low": 0.0, "high": 0.3}}
    cfg, space, _ = tiny_cfg({"storage": f"sqlite:///{tmp_path / 's.db'}"}, space_raw)
    assert cfg.train.hidden_dropout is None and default_params(cfg, space) == {}
    study = optuna.create_study(study_name=cfg.study_name, storage=cfg.storage)
    said: list[str] = []
    queue_first_trials(study, cfg, space, said.append)
    assert study.get_trials() == [] and said == []  # not a sampled trial tagged "defaults"


def test_the_design_covers_every_choice_and_is_seeded() -> None:
    assert design_length(SPACE, None) == 6  # 5 dimensions + 1
    assert design_length(SPACE, 9) == 6
    assert design_length(SPACE, 4) == 4  # the budget fits 4 trials: the whole search is the design
    assert design_length(SPACE, 1) == 2
    points = design_points(SPACE, 6, seed=3)
    assert sorted(p["batch_size"] for p in points) == [8, 8, 16, 16, 32, 32]
    assert sorted(p["scheduler"] for p in points) == ["constant_with_warmup"] * 3 + ["cosine"] * 3
    assert sorted(p["epochs"] for p in points) == [2, 2, 3, 3, 4, 4]
    strata = sorted(int(6 * (p["warmup_ratio"] / 0.2)) for p in points if p["warmup_ratio"] < 0.2)
    assert len(set(strata)) >= 4  # spread over the range, not bunched
    assert points == design_points(SPACE, 6, seed=3)
    assert points != design_points(SPACE, 6, seed=4)


def test_the_design_completes_the_fixed_trials_stratum_by_stratum() -> None:
    defaults = {"learning_rate": 5e-5, "batch_size": 16, "warmup_ratio": 0.0}  # epochs, scheduler unset
    points = design_points(SPACE, 4, seed=0, fixed=[defaults])
    assert len(points) == 3  # 4 strata, one taken by the defaults
    strata = sorted(int(4 * math.log(p["learning_rate"] / 1e-5) / math.log(30)) for p in [defaults, *points])
    assert strata == [0, 1, 2, 3]  # every learning-rate stratum once, the defaults' one not again
    warmups = sorted(p["warmup_ratio"] for p in points)
    assert warmups[0] >= 0.05  # the defaults took the lowest warm-up stratum
    assert design_points(SPACE, 4, seed=0, fixed=[{"hidden_dropout": 0.1}]) == design_points(SPACE, 4, seed=0)
    assert len(design_points(SPACE, 4, seed=0, fixed=[defaults, defaults])) == 2


def test_the_defaults_trial_then_the_design_that_completes_it() -> None:
    sampler = StartupDesign(
        optuna.samplers.RandomSampler(seed=0), SPACE, seed=3, length=4, n_trials=None, budget_s=None
    )
    study = optuna.create_study(sampler=sampler, direction="maximize")
    defaults = {"learning_rate": 5e-5, "batch_size": 16, "warmup_ratio": 0.0, "epochs": 3, "scheduler": "cosine"}
    study.enqueue_trial(defaults, user_attrs={records.ORIGIN: "defaults"})
    for _ in range(5):
        trial = study.ask()
        suggest_params(trial, SPACE)
        study.tell(trial, 0.0)
    origins = [t.user_attrs.get(records.ORIGIN) for t in study.trials]
    assert origins == ["defaults", "design", "design", "design", None]  # 4 strata, one taken by the defaults
    assert [t.params for t in study.trials[1:4]] == design_points(SPACE, 4, seed=3, fixed=[defaults])


def test_the_first_design_trial_fixes_the_design_when_the_plan_changes() -> None:
    sampler = StartupDesign(
        optuna.samplers.RandomSampler(seed=0), SPACE, seed=3, length=None, n_trials=4, budget_s=None
    )
    study = optuna.create_study(sampler=sampler, direction="maximize")
    for number in range(4):
        if number == 1:
            sampler._n_trials = 2  # the plan shrinks after the first design trial (longer trials than expected)
        trial = study.ask()
        suggest_params(trial, SPACE)
        study.tell(trial, 0.0)
    assert [t.params for t in study.trials] == design_points(SPACE, 4, seed=3)  # one hypercube, not two
    assert {t.user_attrs[records.DESIGN_LENGTH] for t in study.trials} == {4}


def test_budget_durations_and_refusals() -> None:
    assert duration_seconds("30m") == 1800
    assert duration_seconds("1.5h") == 5400
    assert duration_seconds("90s") == 90
    assert duration_seconds(45) == 45
    cfg = config_from_dict({**NER_CONFIG, "budget": "2m"}, source="x")
    assert cfg.budget_s == 120 and cfg.n_trials == 3  # n_trials given: kept as an upper bound
    alone = {k: v for k, v in NER_CONFIG.items() if k != "n_trials"}
    assert config_from_dict({**alone, "budget": "2m"}, source="x").n_trials is None
    for bad in ("soon", "-5m", 0, "inf"):
        with pytest.raises(ConfigError, match=r"x: budget: got .*; give a duration such as 30m"):
            config_from_dict({**NER_CONFIG, "budget": bad}, source="x")


def test_a_spent_budget_starts_no_trial_and_stops_a_running_one() -> None:
    spent = Budget(10.0, ends_at=time.time() - 1)
    assert not spent.fits_a_trial([]) and spent.clock().spent_after()
    fresh = Budget(3600.0)
    assert fresh.fits_a_trial([]) and not fresh.clock().spent_after()


def test_rays_pbt_gets_no_queued_trial_it_would_never_run(tiny_cfg, tmp_path: Path) -> None:
    cfg, space, _ = tiny_cfg({"backend": "ray", "storage": f"sqlite:///{tmp_path / 's.db'}"})
    cfg.ray.scheduler = "pbt"  # Ray's random variants: the study is never asked
    study = optuna.create_study(study_name=cfg.study_name, storage=cfg.storage)
    said: list[str] = []
    queue_first_trials(study, cfg, space, said.append)
    assert study.get_trials() == [] and "Ray's PBT draws its own population" in said[0]
    cfg.ray.scheduler = "asha"  # StudySearch asks the study: it runs the queued trial first
    queue_first_trials(study, cfg, space, said.append)
    assert [t.user_attrs[records.ORIGIN] for t in study.get_trials()] == ["defaults"]


def _earlier_study(cfg, space_raw: dict, trials: list[tuple[float, dict]]) -> None:
    """A stored study named ``earlier`` of cfg's config, holding complete ``(value, params)`` trials."""
    from llmflow_hpo.config.study import config_to_dict
    from llmflow_hpo.search.spaces import parse_search_space

    earlier = optuna.create_study(study_name="earlier", storage=cfg.storage, direction="maximize")
    earlier.set_user_attr(records.CONFIG, config_to_dict(cfg))
    earlier.set_user_attr(records.SEARCH_SPACE, space_raw)
    distributions = dict(parse_search_space(space_raw, source="space"))
    for value, params in trials:
        earlier.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))


def test_a_warm_start_takes_no_configuration_the_defaults_trial_runs_already(tiny_cfg, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    cfg, space, space_raw = tiny_cfg({"storage": storage, "warm_start": {"study": "earlier", "top": 2}})
    defaults = default_params(cfg, space)
    other, third = {"learning_rate": 2e-3, "batch_size": 16}, {"learning_rate": 3e-3, "batch_size": 8}
    _earlier_study(cfg, space_raw, [(0.9, defaults), (0.8, other), (0.7, third)])  # its best: its defaults trial
    study = optuna.create_study(study_name=cfg.study_name, storage=storage)
    said: list[str] = []
    queue_first_trials(study, cfg, space, said.append)
    trials = study.get_trials()
    assert [t.system_attrs["fixed_params"] for t in trials] == [defaults, other, third]  # the defaults once
    assert [t.user_attrs[records.ORIGIN] for t in trials] == ["defaults", "warm-start", "warm-start"]
    assert [t.user_attrs[records.WARM_START_FROM] for t in trials[1:]] == ["earlier#1", "earlier#2"]
    assert said[-1] == "study tiny-ner: 2 trial(s) warm-started from earlier#1, earlier#2"


def _search(
    tmp_path: Path, changes: dict, name: str = "study.yaml", space: dict | None = None
) -> subprocess.CompletedProcess:
    cfg = deep_update(NER_CONFIG, {"storage": f"sqlite:///{tmp_path / 's.db'}", "cache_dir": str(tmp_path / "cache")})
    cfg = deep_update(cfg, {"checkpoint": {"dir": str(tmp_path / "ckpt")}, **changes})
    (tmp_path / "space.yaml").write_text(
        yaml.safe_dump(
            space
            or {
                "learning_rate": {"type": "float", "low": 5e-4, "high": 5e-3, "log": True},
                "batch_size": {"type": "categorical", "choices": [4, 8, 16]},
            }
        )
    )
    (tmp_path / name).write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", "search", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _trials(tmp_path: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / 's.db'}").get_trials()


def test_a_new_study_starts_with_the_defaults_then_the_design_and_a_rerun_queues_neither(tmp_path: Path) -> None:
    tpe = {"sampler": {"name": "tpe", "startup": "design", "startup_trials": 3}, "n_trials": 4, "train": {"epochs": 1}}
    result = _search(tmp_path, tpe)
    assert result.returncode == 0, result.stderr
    assert "the first trial runs the recipe's defaults (batch_size=8, learning_rate=0.001)" in result.stderr
    trials = _trials(tmp_path, "tiny-ner")
    assert trials[0].params == {"learning_rate": 1e-3, "batch_size": 8}
    assert trials[0].user_attrs[records.ORIGIN] == "defaults"
    # 3 design points, the one nearest the defaults covered by them: 2 design trials, then the sampler's own
    assert [t.user_attrs.get(records.ORIGIN) for t in trials[1:]] == ["design", "design", None]
    design = trials[1:3]
    assert {t.user_attrs[records.DESIGN_POINT] for t in design} < {0, 1, 2}
    assert len({t.params["batch_size"] for t in design}) == 2  # a stratum each
    again = _search(tmp_path, {**tpe, "n_trials": 5})  # a rerun queues no second defaults trial
    assert again.returncode == 0, again.stderr
    rerun = _trials(tmp_path, "tiny-ner")
    assert len(rerun) == 5 and sum(t.user_attrs.get(records.ORIGIN) == "defaults" for t in rerun) == 1
    assert records.ORIGIN not in rerun[4].user_attrs  # the sampler's own


def test_a_warm_start_from_a_missing_study_is_refused(tiny_cfg, tmp_path: Path) -> None:
    cfg, space, _ = tiny_cfg({"storage": f"sqlite:///{tmp_path / 's.db'}", "warm_start": {"study": "nope"}})
    with pytest.raises(ConfigError, match=r"warm_start.study: no study 'nope' in sqlite:///.*; name an existing"):
        warm_start_params(cfg, space)


def test_the_budget_stops_a_long_trial_keeping_its_best_and_starts_no_other(tmp_path: Path) -> None:
    changes = {"n_trials": None, "budget": "8s", "train": {"epochs": 200, "evals_per_epoch": 2}}
    started = time.monotonic()
    result = _search(tmp_path, changes, space={"learning_rate": {"type": "float", "low": 5e-4, "high": 5e-3}})
    assert result.returncode == 0, result.stderr
    assert "the budget of 8s is spent; no new trial started" in result.stderr
    trials = _trials(tmp_path, "tiny-ner")
    assert [t.state for t in trials] == [TrialState.COMPLETE]  # nothing left running, nothing queued
    trial = trials[0]
    assert trial.user_attrs[records.STOPPED_BY_BUDGET] is True
    assert trial.user_attrs[records.STOPPED_EARLY] is False  # the budget ended it, not early stopping
    assert 1 <= trial.user_attrs[records.EVALUATIONS] < 400  # stopped long before its 200 epochs
    assert time.monotonic() - started < 120
