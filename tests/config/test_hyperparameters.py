"""The hyperparameters' declarations: one per train: setting, read by train: and by the search-space parser."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest

import llmflow_hpo.search.spaces
from llmflow_hpo.config.hyperparameters import (
    HYPERPARAMETERS,
    TRAIN_SETTINGS,
    TrainConfig,
    clip_norm,
)


def test_every_train_setting_is_declared_with_its_help_and_what_reads_it() -> None:
    defaults = TrainConfig()
    assert list(TRAIN_SETTINGS) == [f.name for f in dataclasses.fields(TrainConfig)]
    for name, hp in TRAIN_SETTINGS.items():
        assert hp.name == name
        assert hp.help and hp.used_by, name
        assert hp.default == getattr(defaults, name)
        assert hp.check(hp.default) is None, name  # every default is inside its own domain


def test_the_searchable_names_are_the_declared_ones_in_order() -> None:
    assert list(HYPERPARAMETERS) == [
        "learning_rate",
        "batch_size",
        "epochs",
        "warmup_ratio",
        "scheduler",
        "optimizer",
        "momentum",
        "weight_decay",
        "hidden_dropout",
        "attention_dropout",
        "num_layers",
        "label_smoothing",
        "max_grad_norm",
        "loss",
        "focal_gamma",
        "class_weighting",
        "adapter",
        "lora_r",
        "lora_alpha",
        "lora_alpha_ratio",
        "lora_dropout",
        "lora_targets",
        "lora_rslora",
        "lora_dora",
    ]
    assert all(hp.searchable for hp in HYPERPARAMETERS.values())
    assert not any(TRAIN_SETTINGS[name].searchable for name in set(TRAIN_SETTINGS) - set(HYPERPARAMETERS))


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("learning_rate", 0, "must be > 0"),
        ("batch_size", 0, "must be >= 1"),
        ("warmup_ratio", 1.0, "must be in [0, 1)"),
        ("warmup_ratio", 0, None),
        ("hidden_dropout", 1.0, "must be in [0, 1) or null"),
        ("hidden_dropout", None, None),
        ("max_grad_norm", -1, "must be >= 0 or null"),
        ("max_grad_norm", 0, None),
        ("early_stopping_patience", 0, "must be >= 1 or null (off)"),
        ("device", "gpu", "got 'gpu'; use auto, cpu, cuda or cuda:N"),
        ("device", "cuda:1", None),
        ("optimizer", "adam", "got 'adam'; expected one of 'adamw', 'sgd', 'adafactor' (did you mean 'adamw'?)"),
        ("batch_size", 8.0, "expected an integer, got 8.0"),
        ("epochs", None, "expected an integer, got None"),
        ("learning_rate", "inf", "must be a finite number, got 'inf'"),
    ],
)
def test_one_value_is_checked_against_its_declaration(name: str, value: Any, expected: str | None) -> None:
    assert TRAIN_SETTINGS[name].coerce(value)[1] == expected


def test_a_value_is_converted_to_the_declared_type() -> None:
    assert TRAIN_SETTINGS["learning_rate"].coerce("1e-5") == (1e-5, None)  # YAML 1.1 reads 1e-5 as a string
    assert TRAIN_SETTINGS["label_smoothing"].coerce(0) == (0.0, None)
    assert TRAIN_SETTINGS["scheduler"].coerce("cosine") == ("cosine", None)


def test_train_problems_name_the_field_and_the_settings_that_do_not_go_together() -> None:
    train = TrainConfig(learning_rate=0.0, precision="fp16", device="cpu")
    assert train.problems() == [
        ("train.learning_rate", "must be > 0"),
        ("train.precision", "fp16 needs a GPU (loss scaling is a CUDA feature); use fp32 or bf16 on cpu"),
    ]
    assert TrainConfig().problems() == []


def test_searched_values_reach_the_recipe_as_the_fields_of_their_names() -> None:
    fixed = TrainConfig(epochs=2)
    trial = fixed.with_params({"learning_rate": 3e-4, "max_grad_norm": 0.0})
    assert (trial.learning_rate, trial.epochs, trial.max_grad_norm) == (3e-4, 2, 0.0)
    assert clip_norm(trial.max_grad_norm) is None and clip_norm(1.0) == 1.0
    assert fixed.learning_rate == 1e-4


def test_the_search_space_parser_asks_the_declarations_not_the_config_module() -> None:
    tree = ast.parse(Path(llmflow_hpo.search.spaces.__file__).read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m for m in modules if m and m.startswith("llmflow_hpo.config")} == {
        "llmflow_hpo.config.hyperparameters",
        "llmflow_hpo.config.yamlfile",
    }
