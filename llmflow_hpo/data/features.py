"""Tokenization and label alignment (the task's ``tokenize``), done once per study and cached on disk (HF datasets).

The cache key covers the data files' contents, the data settings, the tokenizer files and this
module's format version, so every trial of a study (and every later run of it) reads the same
tokenized data without tokenizing again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.data.splits import SPLIT_NAMES, DataSplits, load_splits
from llmflow_hpo.recipe.models import load_tokenizer, tokenizer_fingerprint
from llmflow_hpo.tasks import get_task

__all__ = ["Features", "prepare_features", "read_splits"]

_FORMAT_VERSION = "3"  # 2: label_words (the word of each labelled position); 3: tags read as IOB2


@dataclass
class Features:
    task: str
    labels: list[str]
    splits: dict[str, Any]  # split name -> datasets.Dataset
    report: list[str]
    cache_path: Path
    from_cache: bool

    def gold_tags(self, split: str) -> list[list[str]]:
        """Word-level gold tags of a token-classification split (all words, truncated ones too)."""
        return [[self.labels[i] for i in row] for row in self.splits[split]["word_labels"]]

    def gold_labels(self, split: str) -> list[str]:
        return [self.labels[i] for i in self.splits[split]["labels"]]


def _file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return None  # load_splits reports it
    digest = hashlib.sha256()
    # A save_to_disk folder counts by every file in it, each with its name.
    named = sorted((str(f.relative_to(p)), f) for f in p.rglob("*") if f.is_file()) if p.is_dir() else [("", p)]
    for name, file in named:
        digest.update(name.encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _cache_key(cfg: StudyConfig, tokenizer: Any) -> str:
    # The files count by their contents (digests below), not by where they lie.
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in SPLIT_NAMES}
    parts = {
        "format_version": _FORMAT_VERSION,
        "task": cfg.task,
        "data": data,
        "files": {split: _file_digest(getattr(cfg.data, split)) for split in SPLIT_NAMES},
        "seed": cfg.seed,
        "tokenizer": tokenizer_fingerprint(cfg.model, tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_splits(cfg: StudyConfig) -> DataSplits:
    """Read, clean and split the study's data as its data settings say (no tokenizer, no torch)."""
    return load_splits(cfg.data, task=cfg.task, seed=cfg.seed)


def prepare_features(
    cfg: StudyConfig, *, log: Callable[[str], None] | None = None, data: DataSplits | None = None
) -> Features:
    """Read, clean, split and tokenize the study's data, or load it from the cache when nothing changed.

    ``data``: the splits already read by ``read_splits`` (``search`` reads them while it validates), so a
    cache miss does not read the files a second time.
    """
    import datasets

    say = log or (lambda line: print(line, file=sys.stderr))
    assert cfg.cache_dir is not None
    tokenizer = load_tokenizer(cfg.model)
    cache_path = Path(cfg.cache_dir) / "features" / _cache_key(cfg, tokenizer)
    meta_path = cache_path / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        splits = {s: datasets.load_from_disk(str(cache_path / s)) for s in SPLIT_NAMES}
        say(f"data: tokenized splits loaded from cache {cache_path}")
        return Features(cfg.task, meta["labels"], splits, meta["report"], cache_path, from_cache=True)

    data = data if data is not None else read_splits(cfg)
    task = get_task(cfg.task)
    task.check_tokenizer(tokenizer)
    label_ids = {label: i for i, label in enumerate(data.labels)}
    report = list(data.report)
    splits = {}
    for split in SPLIT_NAMES:
        examples = getattr(data, split)
        columns, lines = task.tokenize(examples, tokenizer, label_ids, cfg.data)
        report.extend(f"{split}: {line}" for line in lines)
        # Our cache key is the fingerprint: datasets need not hash (pickle) the whole table to make one.
        table = datasets.table.InMemoryTable.from_pydict(columns)
        splits[split] = datasets.Dataset(table, fingerprint=f"llmflow-{cache_path.name}-{split}")
    for line in report:
        say(f"data: {line}")
    say(
        "data: "
        + ", ".join(f"{s} {len(splits[s])}" for s in SPLIT_NAMES)
        + (f" examples, {len(data.labels)} labels; " if task.labelled else " examples; ")
        + f"tokenized once, cached in {cache_path}"
    )
    # Staged under a name of this process's own, then renamed: workers that tokenize at the same time
    # never see (or delete) each other's half-written folders; the first rename wins, the others drop theirs.
    staging = cache_path.with_name(f"{cache_path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for split, ds in splits.items():
        ds.save_to_disk(str(staging / split))
    (staging / "meta.json").write_text(json.dumps({"labels": data.labels, "report": report}, indent=1))
    if cache_path.exists() and not meta_path.exists():  # left by an older version: incomplete
        shutil.rmtree(cache_path, ignore_errors=True)
    try:
        staging.rename(cache_path)
    except OSError:  # another process stored the same tokenization first
        shutil.rmtree(staging, ignore_errors=True)
    splits = {s: datasets.load_from_disk(str(cache_path / s)) for s in SPLIT_NAMES}
    return Features(cfg.task, data.labels, splits, report, cache_path, from_cache=False)
