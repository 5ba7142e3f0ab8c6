"""YAML files: read with bounds (alias bombs, deep nesting, repeated keys, text that is not UTF-8), and --set."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import raw

from llmflow_hpo.config.yamlfile import apply_overrides, read_yaml
from llmflow_hpo.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------
# --set overrides.


def test_apply_overrides_sets_nested_keys_with_yaml_typed_values() -> None:
    content = raw()
    out = apply_overrides(
        content,
        [
            "train.epochs=2",
            "train.learning_rate=3.0e-5",
            "train.hidden_dropout=null",
            "model.random_init=true",
            "sampler.options.n_startup_trials=4",
            "model.config_overrides={num_hidden_layers: 2}",
            "study_name=a=b",
            "storage=",
        ],
    )
    assert out is content
    assert out["train"] == {"epochs": 2, "learning_rate": 3.0e-5, "hidden_dropout": None}
    assert out["model"]["random_init"] is True
    assert out["sampler"] == {"options": {"n_startup_trials": 4}}
    assert out["model"]["config_overrides"] == {"num_hidden_layers": 2}
    assert out["study_name"] == "a=b"
    assert out["storage"] is None


def test_apply_overrides_replaces_existing_values() -> None:
    out = apply_overrides(raw(data={"format": "conll"}), ["data.format=jsonl", "seed=7"])
    assert out["data"]["format"] == "jsonl"
    assert out["data"]["train"] == "data/train.txt"
    assert out["seed"] == 7


@pytest.mark.parametrize("item", ["train.epochs", "=3", " =3"])
def test_bad_override_syntax(item: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(raw(), [item])
    assert info.value.problems == [f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2"]


def test_override_through_a_scalar_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(raw(), ["task.name=x"])
    assert info.value.problems == ["--set task.name: 'task' is not a section"]


def test_bad_overrides_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(raw(), ["epochs", "task.x=1", "train.epochs=2"])
    assert len(info.value.problems) == 2


# ----------------------------------------------------------------------------------------------------
# Reading YAML files.


def test_read_yaml_reports_unclosed_brackets_at_their_line(tmp_path: Path) -> None:
    path = write(tmp_path, "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=r"line \d+: invalid YAML") as info:
        read_yaml(path)
    assert "\n" not in str(info.value)


def _billion_laughs(levels: int = 9) -> str:
    rows = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    rows += [f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]" for k in range(1, levels)]
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_billion_laughs(), r"line \d+: invalid YAML: more than 10000 values once its aliases are expanded"),
        ("a: &a [1, *a]\n", r"line 1: invalid YAML: alias \*a refers to a value that contains it"),
        ("a: " + "[" * 20_000 + "]" * 20_000 + "\n", r"line 1: invalid YAML: nested more than 50 levels"),
        ("n_trials: 2\nseed: 1\nn_trials: 3\n", r"line 3: invalid YAML: key 'n_trials' given twice \(also on line 1\)"),
    ],
    ids=["alias-bomb", "recursive-alias", "nested-20000", "repeated-key"],
)
def test_read_yaml_refuses_what_would_blow_up_or_be_lost(tmp_path: Path, text: str, message: str) -> None:
    import time

    path = write(tmp_path, text)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=message):
        read_yaml(path)
    assert time.monotonic() - start < 2.0  # refused, not expanded


def test_read_yaml_keeps_ordinary_anchors_and_merge_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\nlist: [*b, *b]\n")
    assert read_yaml(path) == {"base": {"x": 1, "y": 2}, "other": {"x": 1, "y": 3}, "list": [{"x": 1, "y": 2}] * 2}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("task: demo\n".encode("utf-16"), "the file is UTF-16 text; save it as UTF-8"),
        ("task: demo\n".encode("utf-16-le"), ".*NUL bytes.*save it as UTF-8"),
        (bytes(range(256)), ".*NUL bytes.*save it as UTF-8"),
        (
            "a: 1\ntask: d\u00e9mo\n".encode("latin-1"),
            r"line 2: not UTF-8 text \(byte 0xe9 at offset 12\); save it as UTF-8",
        ),
    ],
    ids=["utf16", "utf16-no-bom", "binary", "latin-1"],
)
def test_read_yaml_of_a_file_that_is_not_utf8_says_to_save_it_as_utf8(
    tmp_path: Path, data: bytes, message: str
) -> None:
    path = tmp_path / "study.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=rf"{path}: {message}"):
        read_yaml(path)


def test_read_yaml_accepts_a_utf8_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_bytes(b"\xef\xbb\xbftask: demo\n")
    assert read_yaml(path) == {"task": "demo"}


def test_set_override_with_an_alias_bomb_is_refused() -> None:
    value = (
        "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], "
        + ", ".join(f"&b{k} [" + ", ".join(["*a"] * 10) + "]" for k in range(2))
        + "]"
    )
    bomb = "{" + ", ".join(f"k{i}: [{', '.join(['*a'] * 10)}]" for i in range(200)) + "}"
    assert apply_overrides({}, [f"x={value}"]) == {"x": [[1] * 10, [[1] * 10] * 10, [[1] * 10] * 10]}
    with pytest.raises(ConfigError, match=r"--set model\.config_overrides: more than 10000 values"):
        apply_overrides({}, [f"model.config_overrides=[&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], {bomb}]"])
