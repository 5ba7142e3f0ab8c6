"""Search spaces: YAML declarations become optuna distributions; every problem is reported at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from llmflow_hpo.config.hyperparameters import HYPERPARAMETERS
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.search.spaces import load_search_space, parse_search_space, suggest_params

optuna.logging.set_verbosity(optuna.logging.WARNING)


def parse(text: str, source: str = "space.yaml") -> dict[str, Any]:
    return parse_search_space(yaml.safe_load(text), source=source)


def problems(text: str, source: str = "space.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, source)
    return info.value.problems


def only_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# ----------------------------------------------------------------------------------------------------
# Declarations -> distributions.


def test_float_log() -> None:
    space = parse("learning_rate: {type: float, low: 1.0e-5, high: 3.0e-4, log: true}")
    assert space == {"learning_rate": FloatDistribution(1e-5, 3e-4, log=True)}


def test_float_linear_and_step() -> None:
    space = parse(
        "weight_decay: {type: float, low: 0.0, high: 0.1}\nwarmup_ratio: {type: float, low: 0, high: 0.2, step: 0.05}"
    )
    assert space["weight_decay"] == FloatDistribution(0.0, 0.1)
    assert space["warmup_ratio"] == FloatDistribution(0.0, 0.2, step=0.05)


def test_float_bounds_written_without_a_dot() -> None:
    space = parse("learning_rate: {type: float, low: 1e-5, high: 1e-3, log: true}")
    assert space["learning_rate"] == FloatDistribution(1e-5, 1e-3, log=True)


def test_int_linear_step_and_log() -> None:
    space = parse("epochs: {type: int, low: 1, high: 5}\nbatch_size: {type: int, low: 8, high: 64, log: true}")
    assert space == {"epochs": IntDistribution(1, 5), "batch_size": IntDistribution(8, 64, log=True)}
    assert parse("epochs: {type: int, low: 1, high: 9, step: 2}") == {"epochs": IntDistribution(1, 9, step=2)}


def test_categorical() -> None:
    space = parse(
        "batch_size: {type: categorical, choices: [8, 16, 32]}\n"
        "scheduler: {type: categorical, choices: [linear, cosine]}\n"
        "max_grad_norm: {type: categorical, choices: [0.5, 1.0, null]}\n"
    )
    assert space["batch_size"] == CategoricalDistribution([8, 16, 32])
    assert space["scheduler"] == CategoricalDistribution(["linear", "cosine"])
    assert space["max_grad_norm"] == CategoricalDistribution([0.5, 1.0, None])


def test_order_of_the_file_is_kept() -> None:
    space = parse(
        "weight_decay: {type: float, low: 0.0, high: 0.1}\nbatch_size: {type: categorical, choices: [8]}\n"
        "epochs: {type: int, low: 1, high: 2}"
    )
    assert list(space) == ["weight_decay", "batch_size", "epochs"]


def test_load_search_space_returns_distributions_and_raw(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("# header\nepochs: {type: int, low: 1, high: 3}\n", encoding="utf-8")
    space, raw = load_search_space(path)
    assert space == {"epochs": IntDistribution(1, 3)}
    assert raw == {"epochs": {"type": "int", "low": 1, "high": 3}}


def test_categorical_float_choices_written_without_a_dot_are_floats() -> None:
    space = parse("learning_rate: {type: categorical, choices: [1e-5, 3e-5]}")
    params = suggest_params(optuna.trial.FixedTrial({"learning_rate": 1e-5}), space)
    assert space["learning_rate"] == CategoricalDistribution([1e-5, 3e-5])
    assert params == {"learning_rate": 1e-5}


# ----------------------------------------------------------------------------------------------------
# Errors.


def test_unknown_parameter_with_suggestion() -> None:
    message = only_problem("learning_rte: {type: float, low: 1.0e-5, high: 1.0e-3}")
    assert message == "space.yaml: learning_rte: not a searchable hyperparameter (did you mean 'learning_rate'?)"


def test_unknown_parameter_without_close_match_lists_the_searchable_ones() -> None:
    message = only_problem("zzz: {type: float, low: 0, high: 1}")
    assert message.startswith("space.yaml: zzz: not a searchable hyperparameter; searchable: ")
    assert all(name in message for name in HYPERPARAMETERS)


def test_recipe_settings_are_not_searchable() -> None:
    message = only_problem("eval_batch_size: {type: categorical, choices: [32, 64]}")
    assert "eval_batch_size: not a searchable hyperparameter" in message


@pytest.mark.parametrize("kind", ["floot", "uniform", None])
def test_unknown_type(kind: str | None) -> None:
    spec = {"low": 0.0, "high": 0.1} if kind is None else {"type": kind, "low": 0.0, "high": 0.1}
    with pytest.raises(ConfigError) as info:
        parse_search_space({"weight_decay": spec}, source="space.yaml")
    assert info.value.problems == [f"space.yaml: weight_decay.type: got {kind!r}; expected float, int or categorical"]


def test_declaration_that_is_not_a_mapping() -> None:
    message = only_problem("weight_decay: [0.0, 0.1]")
    assert message.startswith("space.yaml: weight_decay: expected a mapping")


@pytest.mark.parametrize(
    ("text", "unknown"),
    [
        ("weight_decay: {type: float, low: 0.0, high: 0.1, lg: true}", "lg"),
        ("batch_size: {type: categorical, choices: [8], low: 1}", "low"),
        ("epochs: {type: int, low: 1, high: 3, choices: [1]}", "choices"),
    ],
)
def test_unknown_keys(text: str, unknown: str) -> None:
    message = only_problem(text)
    assert f"unknown key(s) {unknown} for type" in message
    assert "allowed: " in message


@pytest.mark.parametrize(
    "text",
    [
        "weight_decay: {type: float, low: 0.1, high: 0.1}",
        "weight_decay: {type: float, low: 0.2, high: 0.1}",
        "epochs: {type: int, low: 3, high: 1}",
    ],
)
def test_low_must_be_below_high(text: str) -> None:
    assert "must be below high" in only_problem(text)


def test_log_needs_positive_low() -> None:
    message = only_problem("weight_decay: {type: float, low: 0.0, high: 0.1, log: true}")
    assert message == "space.yaml: weight_decay.low: log scale needs low > 0, got 0.0"


@pytest.mark.parametrize(
    "text",
    [
        "learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true, step: 1.0e-5}",
        "batch_size: {type: int, low: 8, high: 64, log: true, step: 8}",
    ],
)
def test_step_with_log_is_refused(text: str) -> None:
    assert "step and log cannot be combined" in only_problem(text)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("epochs: {type: int, low: 1.5, high: 3}", "epochs.low"),
        ("epochs: {type: int, low: 1, high: three}", "epochs.high"),
        ("weight_decay: {type: float, low: 0.0}", "weight_decay.high"),
        ("weight_decay: {type: float, low: 0.0, high: 0.1, log: 1}", "weight_decay.log"),
        ("weight_decay: {type: float, low: 0.0, high: 0.1, step: 0}", "weight_decay.step"),
        ("epochs: {type: int, low: 1, high: 3, step: 0.5}", "epochs.step"),
    ],
)
def test_bad_bounds_log_and_step(text: str, field: str) -> None:
    assert only_problem(text).startswith(f"space.yaml: {field}: ")


@pytest.mark.parametrize("choices", ["[]", "8", "null"])
def test_choices_must_be_a_non_empty_list(choices: str) -> None:
    message = only_problem(f"batch_size: {{type: categorical, choices: {choices}}}")
    assert message == "space.yaml: batch_size.choices: expected a non-empty list"


def test_repeated_choices() -> None:
    message = only_problem("batch_size: {type: categorical, choices: [8, 16, 8]}")
    assert message.startswith("space.yaml: batch_size.choices: repeated values")


def test_choices_must_be_scalars() -> None:
    assert "is not a scalar" in only_problem("batch_size: {type: categorical, choices: [[8], 16]}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optimizer: {type: categorical, choices: [adamw, adam]}", "'adam'"),
        ("batch_size: {type: categorical, choices: [0, 8]}", "must be >= 1"),
        ("batch_size: {type: categorical, choices: ['16']}", "expected an integer"),
        ("hidden_dropout: {type: float, low: 0.0, high: 1.5}", "must be in [0, 1)"),
        ("learning_rate: {type: float, low: 0.0, high: 1.0e-3}", "must be > 0"),
        ("epochs: {type: int, low: 0, high: 3}", "must be >= 1"),
        ("scheduler: {type: categorical, choices: [linear, cosin]}", "did you mean 'cosine'?"),
    ],
)
def test_values_outside_the_hyperparameters_domain(text: str, expected: str) -> None:
    message = only_problem(text)
    name = text.split(":")[0]
    assert message.startswith(f"space.yaml: {name}")
    assert expected in message


def test_float_declaration_of_an_integer_hyperparameter() -> None:
    found = problems("epochs: {type: float, low: 1.0, high: 3.0}")
    assert found == [
        "space.yaml: epochs: bound 1.0: expected an integer, got 1.0",
        "space.yaml: epochs: bound 3.0: expected an integer, got 3.0",
    ]


def test_null_choice_allowed_only_where_the_field_is_nullable() -> None:
    assert parse("hidden_dropout: {type: categorical, choices: [null, 0.1]}")
    message = only_problem("weight_decay: {type: categorical, choices: [null, 0.1]}")
    assert message == "space.yaml: weight_decay.choices: None: expected a number, got None"


def test_all_problems_are_reported_together() -> None:
    found = problems(
        "learning_rte: {type: float, low: 1.0e-5, high: 1.0e-3}\n"
        "weight_decay: {type: float, low: 0.2, high: 0.1}\n"
        "optimizer: {type: categorical, choices: [adam]}\n"
        "batch_size: {type: categorical, choices: [8, 8]}\n"
        "epochs: {type: floot, low: 1, high: 3}\n"
        "warmup_ratio: {type: float, low: 0.0, high: 0.2}\n"
    )
    assert len(found) == 5
    for name in ("learning_rte", "weight_decay", "optimizer", "batch_size", "epochs"):
        assert any(p.startswith(f"space.yaml: {name}") for p in found), (name, found)


@pytest.mark.parametrize("text", ["", "# only comments\n", "{}"])
def test_empty_space(text: str) -> None:
    with pytest.raises(ConfigError, match="the search space is empty"):
        parse(text)


def test_space_that_is_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a mapping of parameter names"):
        parse("- learning_rate\n")


def test_missing_search_space_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_search_space(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------------------------------
# suggest_params.


def test_suggest_params_with_fixed_trial_returns_the_fixed_values() -> None:
    space = parse(
        "learning_rate: {type: float, low: 1.0e-5, high: 3.0e-4, log: true}\n"
        "warmup_ratio: {type: float, low: 0.0, high: 0.2, step: 0.05}\n"
        "epochs: {type: int, low: 1, high: 4}\n"
        "scheduler: {type: categorical, choices: [linear, cosine]}\n"
        "max_grad_norm: {type: categorical, choices: [1.0, null]}\n"
    )
    fixed = {"learning_rate": 2e-5, "warmup_ratio": 0.1, "epochs": 3, "scheduler": "cosine", "max_grad_norm": None}
    assert suggest_params(optuna.trial.FixedTrial(fixed), space) == fixed


def test_suggest_params_with_fixed_trial_missing_a_value_fails() -> None:
    space = parse("epochs: {type: int, low: 1, high: 4}")
    with pytest.raises(ValueError):
        suggest_params(optuna.trial.FixedTrial({}), space)


def test_suggest_params_with_a_real_trial_stays_in_range() -> None:
    space = parse(
        "learning_rate: {type: float, low: 1.0e-5, high: 3.0e-4, log: true}\n"
        "warmup_ratio: {type: float, low: 0.0, high: 0.2, step: 0.05}\n"
        "weight_decay: {type: float, low: 0.0, high: 0.1}\n"
        "epochs: {type: int, low: 1, high: 9, step: 2}\n"
        "batch_size: {type: int, low: 8, high: 64, log: true}\n"
        "scheduler: {type: categorical, choices: [linear, cosine]}\n"
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        p = suggest_params(trial, space)
        assert list(p) == list(space)
        assert 1e-5 <= p["learning_rate"] <= 3e-4
        assert 0.0 <= p["warmup_ratio"] <= 0.2
        assert round(p["warmup_ratio"] / 0.05, 6) == round(p["warmup_ratio"] / 0.05)
        assert 0.0 <= p["weight_decay"] <= 0.1
        assert p["epochs"] in (1, 3, 5, 7, 9)
        assert isinstance(p["batch_size"], int) and 8 <= p["batch_size"] <= 64
        assert p["scheduler"] in ("linear", "cosine")
        assert trial.distributions == space
        study.tell(trial, 0.0)


# ----------------------------------------------------------------------------------------------------
# Steps that do not divide the range, and choices that repeat once read (optuna would accept both quietly).


@pytest.mark.parametrize(
    ("text", "fixes"),
    [
        ("weight_decay: {type: float, low: 0.0, high: 0.1, step: 0.03}", ("set high to 0.09 or 0.12", "divides 0.1")),
        ("epochs: {type: int, low: 1, high: 10, step: 2}", ("set high to 9 or 11", "divides 9")),
    ],
)
def test_step_that_does_not_divide_the_range_is_refused(text: str, fixes: tuple[str, ...]) -> None:
    message = only_problem(text)
    name = text.split(":")[0]
    assert message.startswith(f"space.yaml: {name}.step: "), message
    assert "optuna would search only" in message
    for fix in fixes:
        assert fix in message


def test_steps_that_divide_the_range_up_to_rounding_are_kept() -> None:
    space = parse("warmup_ratio: {type: float, low: 0.1, high: 0.7, step: 0.1}")
    assert space["warmup_ratio"] == FloatDistribution(0.1, 0.7, step=0.1)


@pytest.mark.parametrize("choices", ["[1e-5, 1.0e-5]", "['1e-5', 0.00001]", "[0.5, 1, 1.0]"])
def test_choices_that_repeat_once_read_are_refused(choices: str) -> None:
    name = "learning_rate" if "e-5" in choices else "focal_gamma"
    message = only_problem(f"{name}: {{type: categorical, choices: {choices}}}")
    assert message.startswith(f"space.yaml: {name}.choices: repeated values"), message
    assert "drop the repeats" in message
