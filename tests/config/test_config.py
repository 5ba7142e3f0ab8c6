"""The study config: loading, defaults, path resolution, every kind of problem, --set through the loader, round trip.

Reading YAML files and applying --set to a raw mapping: test_yamlfile.py; the train: settings: test_hyperparameters.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MINIMAL_STUDY as MINIMAL
from conftest import raw

from llmflow_hpo.config.study import (
    StudyConfig,
    config_from_dict,
    config_to_dict,
    load_study_config,
)
from llmflow_hpo.errors import ConfigError, LlmflowError

TEXT_MINIMAL: dict[str, Any] = {
    **MINIMAL,
    "task": "text-classification",
    "data": {"format": "csv", "train": "data/train.csv"},
}


def write(tmp_path: Path, content: dict[str, Any] | str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content), encoding="utf-8")
    return path


def problems_of(content: dict[str, Any], source: str = "study.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(content, source=source)
    return info.value.problems


def only_problem(content: dict[str, Any], source: str = "study.yaml") -> str:
    found = problems_of(content, source)
    assert len(found) == 1, found
    return found[0]


# ----------------------------------------------------------------------------------------------------
# A valid config and its defaults.


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_study_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, StudyConfig)
    assert cfg.task == "token-classification"
    assert cfg.study_name == "demo"
    assert cfg.seed == 42
    assert cfg.n_trials == 20
    assert cfg.timeout is None
    assert cfg.sampler.name == "tpe"
    assert cfg.pruner.name == "median"
    assert (cfg.train.learning_rate, cfg.train.batch_size) == (1e-4, 8)
    assert cfg.train.epochs == 3
    assert cfg.data.dev is None


def test_metric_and_direction_defaults_per_task() -> None:
    token = config_from_dict(raw(), source="s.yaml")
    assert (token.metric, token.direction) == ("f1", "maximize")
    text = config_from_dict(raw(TEXT_MINIMAL), source="s.yaml")
    assert (text.metric, text.direction) == ("accuracy", "maximize")


def test_loss_metric_defaults_to_minimize_and_explicit_direction_is_kept() -> None:
    loss = config_from_dict(raw(objective={"metric": "loss"}), source="s.yaml")
    assert (loss.metric, loss.direction) == ("loss", "minimize")
    explicit = config_from_dict(raw(objective={"metric": "loss", "direction": "minimize"}), source="s.yaml")
    assert explicit.direction == "minimize"


def test_storage_defaults_to_sqlite_file_beside_the_config(tmp_path: Path) -> None:
    cfg = load_study_config(write(tmp_path, MINIMAL, "configs/study.yaml"))
    assert cfg.storage == f"sqlite:///{(tmp_path / 'configs' / 'demo.db').resolve()}"


def test_explicit_storage_is_kept(tmp_path: Path) -> None:
    cfg = load_study_config(write(tmp_path, raw(storage="postgresql://u@h/db")))
    assert cfg.storage == "postgresql://u@h/db"


def test_relative_paths_resolve_from_the_config_folder(tmp_path: Path) -> None:
    content = raw(
        search_space="../spaces/space.yaml",
        data={"train": "data/train.txt", "dev": "data/dev.txt", "test": str(tmp_path / "abs" / "test.txt")},
    )
    cfg = load_study_config(write(tmp_path, content, "configs/study.yaml"))
    folder = (tmp_path / "configs").resolve()
    assert cfg.search_space == str((folder / ".." / "spaces" / "space.yaml").resolve())
    assert cfg.data.train == str(folder / "data" / "train.txt")
    assert cfg.data.dev == str(folder / "data" / "dev.txt")
    assert cfg.data.test == str((tmp_path / "abs" / "test.txt").resolve())


def test_exponent_without_a_dot_is_read_as_a_float(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 1e-5 as the string "1e-5".
    assert yaml.safe_load("x: 1e-5")["x"] == "1e-5"
    text = yaml.safe_dump(MINIMAL) + "train:\n  learning_rate: 1e-5\n  weight_decay: 1e-2\n"
    cfg = load_study_config(write(tmp_path, text))
    assert cfg.train.learning_rate == pytest.approx(1e-5)
    assert isinstance(cfg.train.learning_rate, float)
    assert cfg.train.weight_decay == pytest.approx(1e-2)


def test_max_grad_norm_zero_means_no_clipping() -> None:
    cfg = config_from_dict(raw(train={"max_grad_norm": 0}), source="s.yaml")
    assert cfg.train.max_grad_norm is None


def test_integer_and_fraction_splits_keep_their_kind() -> None:
    cfg = config_from_dict(raw(data={"dev_split": 100, "test_split": 0.2}), source="s.yaml")
    assert cfg.data.dev_split == 100 and isinstance(cfg.data.dev_split, int)
    assert cfg.data.test_split == 0.2 and isinstance(cfg.data.test_split, float)


# ----------------------------------------------------------------------------------------------------
# Unknown keys: an error naming the file and the dotted field, with the close match.


def test_unknown_top_level_key_names_file_field_and_suggestion() -> None:
    message = only_problem(raw(n_trial=5), source="cfg/study.yaml")
    assert message.startswith("cfg/study.yaml: n_trial: unknown key")
    assert "did you mean 'n_trials'?" in message


def test_unknown_key_without_close_match_lists_known_keys() -> None:
    message = only_problem(raw(zzzz=1))
    assert "zzzz: unknown key" in message
    assert "known keys:" in message and "study_name" in message


NESTED_TYPOS = [
    ("data", "limit_trian", "limit_train"),
    ("model", "name_or_pth", "name_or_path"),
    ("objective", "metrc", "metric"),
    ("sampler", "optons", "options"),
    ("pruner", "nme", "name"),
    ("train", "lerning_rate", "learning_rate"),
]


@pytest.mark.parametrize(("section", "typo", "meant"), NESTED_TYPOS)
def test_unknown_nested_key_is_reported_with_suggestion(section: str, typo: str, meant: str) -> None:
    message = only_problem(raw(**{section: {typo: 1}}), source="study.yaml")
    assert message.startswith("study.yaml: ")
    assert typo in message and "unknown key" in message
    assert f"did you mean {meant!r}?" in message


@pytest.mark.parametrize(("section", "typo", "meant"), NESTED_TYPOS)
def test_unknown_nested_key_names_the_dotted_field(section: str, typo: str, meant: str) -> None:
    message = only_problem(raw(**{section: {typo: 1}}), source="study.yaml")
    assert message.startswith(f"study.yaml: {section}.{typo}: unknown key")


def test_wrong_type_in_a_section_names_the_dotted_field() -> None:
    message = only_problem(raw(train={"epochs": "three"}))
    assert message.startswith("study.yaml: train.epochs: expected an integer")


# ----------------------------------------------------------------------------------------------------
# Wrong types and missing fields.


@pytest.mark.parametrize(
    ("content", "field", "expected"),
    [
        (raw(seed="forty-two"), "seed", "expected an integer"),
        (raw(seed=True), "seed", "expected an integer"),
        (raw(n_trials=2.5), "n_trials", "expected an integer or null"),
        (raw(study_name=7), "study_name", "expected a string"),
        (raw(task="ner"), "task", "expected one of 'token-classification', 'text-classification'"),
        (raw(data=["train.txt"]), "data", "expected a mapping"),
        (raw(model="bert"), "model", "expected a mapping"),
    ],
)
def test_wrong_top_level_types(content: dict[str, Any], field: str, expected: str) -> None:
    message = only_problem(content)
    assert message.startswith(f"study.yaml: {field}: ")
    assert expected in message


@pytest.mark.parametrize(
    ("section", "values", "field", "expected"),
    [
        ("train", {"epochs": "three"}, "epochs", "expected an integer"),
        ("train", {"epochs": 2.0}, "epochs", "expected an integer"),
        ("train", {"learning_rate": "fast"}, "learning_rate", "expected a number"),
        ("train", {"optimizer": "adam"}, "optimizer", "did you mean 'adamw'?"),
        ("model", {"random_init": "yes"}, "random_init", "expected true or false"),
        ("data", {"format": "jsonline"}, "format", "did you mean 'jsonl'?"),
        ("sampler", {"name": "tpee"}, "name", "did you mean 'tpe'?"),
        ("pruner", {"options": [1, 2]}, "options", "expected a mapping"),
    ],
)
def test_wrong_types_in_sections(section: str, values: dict[str, Any], field: str, expected: str) -> None:
    message = only_problem(raw(**{section: values}))
    assert message.startswith("study.yaml: ")
    assert field in message
    assert expected in message


def test_missing_required_fields_are_all_reported() -> None:
    found = problems_of({"task": "token-classification"})
    assert len(found) == 4
    for field in ("study_name", "search_space", "data", "model"):
        assert any(f"study.yaml: {field}: missing" in p for p in found), (field, found)


def test_top_level_that_is_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^s\.yaml: expected a mapping"):
        config_from_dict(["task"], source="s.yaml")


def test_config_error_is_a_known_llmflow_error() -> None:
    with pytest.raises(LlmflowError):
        config_from_dict(raw(n_trials=0), source="s.yaml")


# ----------------------------------------------------------------------------------------------------
# Impossible values.


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (raw(train={"learning_rate": 0}), "train.learning_rate"),
        (raw(train={"learning_rate": -1e-5}), "train.learning_rate"),
        (raw(train={"warmup_ratio": 1.0}), "train.warmup_ratio"),
        (raw(train={"warmup_ratio": -0.1}), "train.warmup_ratio"),
        (raw(train={"hidden_dropout": 1.0}), "train.hidden_dropout"),
        (raw(train={"attention_dropout": -0.1}), "train.attention_dropout"),
        (raw(train={"epochs": 0}), "train.epochs"),
        (raw(train={"batch_size": 0}), "train.batch_size"),
        (raw(train={"momentum": 1.0}), "train.momentum"),
        (raw(train={"device": "gpu"}), "train.device"),
        (raw(train={"device": "cpu", "precision": "fp16"}), "train.precision"),
        (raw(train={"precision": "fp8"}), "train.precision"),
        (raw(data={"dev_split": 1.5}), "data.dev_split"),
        (raw(data={"test_split": 0}), "data.test_split"),
        (raw(data={"max_length": 4}), "data.max_length"),
        (raw(data={"limit_train": 0}), "data.limit_train"),
        (raw(n_trials=0), "n_trials"),
        (raw(timeout=0), "timeout"),
        (raw(study_name="  "), "study_name"),
    ],
)
def test_impossible_values_name_the_field(content: dict[str, Any], field: str) -> None:
    message = only_problem(content)
    assert message.startswith(f"study.yaml: {field}: ")


def test_dropout_null_is_allowed() -> None:
    cfg = config_from_dict(raw(train={"hidden_dropout": None, "attention_dropout": 0.0}), source="s.yaml")
    assert cfg.train.hidden_dropout is None
    assert cfg.train.attention_dropout == 0.0


def test_neither_n_trials_nor_timeout() -> None:
    message = only_problem(raw(n_trials=None))
    assert message == "study.yaml: n_trials: set n_trials, budget or timeout"


def test_timeout_alone_is_enough() -> None:
    cfg = config_from_dict(raw(n_trials=None, timeout=3600), source="s.yaml")
    assert cfg.n_trials is None
    assert cfg.timeout == 3600.0


@pytest.mark.parametrize(
    ("base", "fmt"),
    [(MINIMAL, "csv"), (MINIMAL, "tsv"), (TEXT_MINIMAL, "conll")],
)
def test_format_must_fit_the_task(base: dict[str, Any], fmt: str) -> None:
    message = only_problem(raw(base, data={"format": fmt}))
    assert message.startswith("study.yaml: data.format: ")


def test_jsonl_fits_both_tasks() -> None:
    config_from_dict(raw(data={"format": "jsonl"}), source="s.yaml")
    config_from_dict(raw(TEXT_MINIMAL, data={"format": "jsonl"}), source="s.yaml")


@pytest.mark.parametrize(("base", "metric"), [(MINIMAL, "macro_f1"), (TEXT_MINIMAL, "f1"), (MINIMAL, "bleu")])
def test_metric_must_belong_to_the_task(base: dict[str, Any], metric: str) -> None:
    message = only_problem(raw(base, objective={"metric": metric}))
    assert message.startswith(f"study.yaml: objective.metric: {metric!r} is not a {base['task']} metric")


def test_infinite_learning_rate_is_refused() -> None:
    problems_of(raw(train={"learning_rate": float("inf")}))


# ----------------------------------------------------------------------------------------------------
# Every problem at once.


def test_several_problems_are_reported_together() -> None:
    content = raw(
        n_trials=0,
        train={"learning_rate": 0, "warmup_ratio": 1.0, "epochs": 0},
        data={"dev_split": 1.5},
        objective={"metric": "macro_f1"},
    )
    found = problems_of(content)
    assert len(found) == 6
    for field in (
        "n_trials",
        "train.learning_rate",
        "train.warmup_ratio",
        "train.epochs",
        "data.dev_split",
        "objective.metric",
    ):
        assert any(p.startswith(f"study.yaml: {field}: ") for p in found), (field, found)


def test_several_type_problems_are_reported_together() -> None:
    found = problems_of(raw(seed="x", n_trial=3, train={"epochs": "x"}, model={"random_init": 3}))
    assert len(found) == 4


def test_config_error_message_joins_every_problem_on_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw(n_trials=0, train={"epochs": 0}), source="s.yaml")
    assert len(info.value.problems) == 2
    assert "\n" not in str(info.value)
    assert str(info.value) == "; ".join(info.value.problems)


def test_type_and_range_problems_are_reported_together() -> None:
    found = problems_of(raw(task="ner", train={"epochs": 0}))
    assert len(found) == 2


def test_load_with_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    cfg = load_study_config(path, ["train.epochs=5", "n_trials=3", "train.learning_rate=1e-4", "objective.metric=loss"])
    assert cfg.train.epochs == 5
    assert cfg.n_trials == 3
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.direction == "minimize"
    assert load_study_config(path).train.epochs == 3  # the file is not changed


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_study_config(path, ["train.epochs=0", "n_trial=4", "data.dev_split=1.5"])
    found = info.value.problems
    assert len(found) == 3
    assert f"{path}: n_trial: unknown key (did you mean 'n_trials'?)" in found
    assert any(p.startswith(f"{path}: train.epochs: must be >= 1") for p in found)
    assert any(p.startswith(f"{path}: data.dev_split: ") for p in found)


def test_bad_override_syntax_through_the_loader(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_study_config(write(tmp_path, MINIMAL), ["train.epochs"])


# ----------------------------------------------------------------------------------------------------
# Files that cannot be read.


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_study_config(path)
    assert info.value.problems == [f"{path}: the file is empty"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_study_config(path)
    assert info.value.problems == [f"{path}: file not found"]


def test_yaml_syntax_error_is_one_line_with_the_line_number(tmp_path: Path) -> None:
    text = "task: token-classification\nstudy_name: demo\ndata:\n\tformat: conll\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_study_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 4: invalid YAML: ")
    assert "\n" not in message
    assert len(info.value.problems) == 1


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "runs/x", "a\\b", "..", ".", "a\nb", " x", "x" * 201])
def test_study_name_must_be_a_plain_name(name: str) -> None:
    with pytest.raises(ConfigError, match=r"study_name: .* is not a plain name"):
        config_from_dict(raw(MINIMAL, study_name=name), source="s.yaml")


def test_study_name_may_hold_dots_dashes_and_unicode() -> None:
    assert config_from_dict(raw(MINIMAL, study_name="ner-v1.2_é"), source="s.yaml").study_name == "ner-v1.2_é"


# ----------------------------------------------------------------------------------------------------
# Round trip: what the study stores is a valid config that loads back to the same object.


def test_config_round_trip(tmp_path: Path) -> None:
    content = raw(
        TEXT_MINIMAL,
        seed=7,
        n_trials=None,
        timeout=90,
        data={"dev_split": 50, "test_split": 0.2, "text_column": 1, "label_column": "y"},
        model={"config_overrides": {"num_hidden_layers": 2}},
        objective={"metric": "macro_f1"},
        sampler={"name": "random"},
        pruner={"name": "percentile", "options": {"percentile": 25.0}},
        train={"learning_rate": "1e-4", "hidden_dropout": 0.2, "max_grad_norm": 0, "scheduler": "cosine"},
        cache_dir="cache",
    )
    cfg = load_study_config(write(tmp_path, content))
    data = config_to_dict(cfg)
    assert yaml.safe_load(yaml.safe_dump(data)) == data  # plain data
    again = config_from_dict(data, source="stored")
    assert again == cfg
    assert config_to_dict(again) == data


# ----------------------------------------------------------------------------------------------------
# Values validate used to pass and search (or optuna, mid-study) refused, and meaningless studies.


@pytest.mark.parametrize("seed", [-1, 2**32, 10**20])
def test_seed_outside_32_bits_is_refused(seed: int) -> None:
    (problem,) = problems_of(raw(seed=seed))
    assert problem.startswith(f"study.yaml: seed: got {seed}; must be in 0..4294967295"), problem


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_seed_bounds_are_kept(seed: int) -> None:
    assert config_from_dict(raw(seed=seed), source="s.yaml").seed == seed


@pytest.mark.parametrize(
    ("encoding", "expected"),
    [
        ("utf9", "unknown text encoding 'utf9'"),
        ("cp-1252", "(did you mean 'cp1252'?)"),
        ("base64", "'base64' is not a text encoding"),
    ],
)
def test_unknown_or_binary_encoding_is_refused(encoding: str, expected: str) -> None:
    (problem,) = problems_of(raw(data={"format": "conll", "train": "t.txt", "encoding": encoding}))
    assert problem.startswith("study.yaml: data.encoding: "), problem
    assert expected in problem


@pytest.mark.parametrize("encoding", ["utf-8", "UTF-8", "latin1", "utf-8-sig", "cp1252"])
def test_text_encodings_are_kept(encoding: str) -> None:
    cfg = config_from_dict(raw(data={"format": "conll", "train": "t.txt", "encoding": encoding}), source="s.yaml")
    assert cfg.data.encoding == encoding


@pytest.mark.parametrize(
    ("objective", "right"),
    [
        ({"metric": "loss", "direction": "maximize"}, "minimize"),
        ({"metric": "f1", "direction": "minimize"}, "maximize"),
    ],
)
def test_direction_that_searches_for_the_worst_model_is_refused(objective: dict[str, str], right: str) -> None:
    (problem,) = problems_of(raw(objective=objective))
    assert problem.startswith("study.yaml: objective.direction: "), problem
    assert f"searches for the worst model; use {right}" in problem


def test_default_metric_with_minimize_is_refused() -> None:
    (problem,) = problems_of(raw(TEXT_MINIMAL, objective={"direction": "minimize"}))
    assert "minimize of dev accuracy searches for the worst model" in problem


def test_a_study_stored_before_the_new_study_checks_is_still_read(tmp_path: Path) -> None:
    """The checks that refuse new studies (worst-model direction, a path as study name, a non-dividing step,
    choices repeated once read) do not lock users out of studies an earlier version stored."""
    import optuna

    from llmflow_hpo.config.study import config_to_dict
    from llmflow_hpo.search.spaces import parse_search_space
    from llmflow_hpo.study.provenance import stored_config

    old = raw(objective={"metric": "loss", "direction": "maximize"}, study_name="team/ner")
    space = {"warmup_ratio": {"type": "float", "low": 0.0, "high": 0.1, "step": 0.03}}
    space["learning_rate"] = {"type": "categorical", "choices": [1e-5, 1.0e-5]}
    assert len(problems_of(old)) == 2  # both refused for a new study
    with pytest.raises(ConfigError):
        parse_search_space(space, source="space.yaml")
    stored = config_from_dict(old, source="x", stored=True)
    study = optuna.create_study(study_name="team/ner", storage=f"sqlite:///{tmp_path / 'old.db'}")
    study.set_user_attr("config", config_to_dict(stored))
    study.set_user_attr("search_space", space)
    cfg, dists, _ = stored_config(study)
    assert cfg.direction == "maximize" and cfg.study_name == "team/ner"
    assert set(dists) == {"warmup_ratio", "learning_rate"}
