"""A study's three splits: each file read, cleaned and relabelled, the missing splits carved from train, the
examples that occur in more than one split found (and, with ``data.dedupe``, dropped from train), and a
report that says what came from where.

``load_splits`` runs it all for a study's ``data:`` settings (``config.study.DataConfig``);
``read_file_examples`` reads one file so (``predict --evaluate``). Every problem with a file is a
``DataError`` naming it (and the line or row, where there is one); nothing is dropped or changed without a
report line that says so.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmflow_hpo.data.clean import clean_examples, plural
from llmflow_hpo.data.labels import LabelRules
from llmflow_hpo.data.read import check_format, read_file
from llmflow_hpo.errors import DataError
from llmflow_hpo.tasks import BaseTask, get_task

__all__ = [
    "SPLIT_NAMES",
    "DataSplits",
    "Source",
    "load_splits",
    "read_file_examples",
    "split_examples",
    "split_sources",
    "stratify_problem",
]

SPLIT_NAMES: tuple[str, ...] = ("train", "dev", "test")


@dataclass
class DataSplits:
    """The train, dev and test examples of a study, their label set, and what was done to get them."""

    train: list = field(metadata={"help": "training examples (the example class of the study's task)"})
    dev: list = field(metadata={"help": "examples scored during the search"})
    test: list = field(metadata={"help": "examples kept for the final evaluation of the best trial"})
    labels: list[str] = field(
        metadata={"help": 'NER: every tag seen, "O" first then sorted (or data.labels); classification: sorted'}
    )
    report: list[str] = field(metadata={"help": "human-readable lines: what was read, removed, normalised and split"})


@dataclass(frozen=True)
class Source:
    """Where a split's examples are read: a file, or one split of a ``save_to_disk`` folder."""

    path: Path
    split: str | None = None

    @property
    def name(self) -> str:
        """How report lines name it: the file's name, or ``folder[split]``."""
        return f"{self.path.name}[{self.split}]" if self.split else self.path.name

    def __str__(self) -> str:
        return f"split {self.split!r} of {self.path}" if self.split else str(self.path)


# --------------------------------------------------------------------------------------- sources


def split_sources(data: Any) -> dict[str, Source]:
    """The source of each split that has one (``data.train``/``dev``/``test``; for hf-disk, the splits of the
    folders, as ``data.splits`` names them). A split without one is carved from train."""
    if data.format != "hf-disk":
        return {name: Source(Path(getattr(data, name))) for name in SPLIT_NAMES if getattr(data, name)}
    from llmflow_hpo.data.tables import folder_splits

    sources: dict[str, Source] = {}
    for name in SPLIT_NAMES:
        given = getattr(data, name)
        folder = Path(given or data.train)
        splits = folder_splits(folder)
        if splits is None:  # a folder of one Dataset: that split, where it is given
            if given:
                sources[name] = Source(folder)
            continue
        wanted = _folder_split(name, splits, data, own_folder=bool(given) and (name == "train" or given != data.train))
        if wanted is None and name == "train":
            raise DataError(folder, f"which split is train? The folder has {', '.join(splits)}; set data.splits.train")
        if wanted is not None and wanted not in splits:
            raise DataError(
                folder, f"no split {wanted!r} for {name} (the folder has {', '.join(splits)}); fix data.splits"
            )
        if wanted is not None:
            sources[name] = Source(folder, wanted)
    return sources


def _folder_split(name: str, splits: list[str], data: Any, *, own_folder: bool) -> str | None:
    """The split of a folder that split ``name`` is: the one data.splits names; else (unless data.splits names
    others of train's folder) the first of the usual names the folder has; None: not in the folder."""
    from llmflow_hpo.data.tables import DEV_SPLIT_NAMES

    if name in data.splits:
        return data.splits[name]
    if data.splits and not own_folder:
        return None
    usual = {"train": ("train",), "dev": DEV_SPLIT_NAMES, "test": ("test",)}[name]
    found = next((split for split in usual if split in splits), None)
    return found or (splits[0] if name == "train" and len(splits) == 1 else None)


# --------------------------------------------------------------------------------------- a study's data


def load_splits(data: Any, *, task: str, seed: int = 0) -> DataSplits:
    """Read, clean, relabel and (where dev or test has no source) carve the three splits of a study.

    ``data``: the study's ``DataConfig``. ``data.limit_*`` keeps the first N examples of that source. A missing
    test split is carved from train first, then a missing dev split; a fraction is of the train examples as
    read and cleaned. Classification splits are stratified by label when possible.
    """
    spec = get_task(task)
    check_format(spec, data.format)
    rules = LabelRules.of(data)
    sources = split_sources(data)
    report: list[str] = []
    limits = {"train": data.limit_train, "dev": data.limit_dev, "test": data.limit_test}
    loaded = {name: _read_split(source, limits[name], spec, data, rules, report) for name, source in sources.items()}
    origin = {name: f"from {source}" for name, source in sources.items()}
    train_path = sources["train"].path
    _require_examples("train", loaded["train"], train_path)
    amounts = {"test": data.test_split, "dev": data.dev_split}
    _carve_missing(spec, loaded, amounts, seed=seed, train_path=train_path, report=report, origin=origin)
    for name in SPLIT_NAMES:
        _require_examples(name, loaded[name], sources[name].path if name in sources else train_path)
    _overlaps(spec, loaded, dedupe=data.dedupe, report=report, origin=origin)
    _require_something_to_learn(spec, loaded["train"], train_path)
    splits = DataSplits(
        train=loaded["train"],
        dev=loaded["dev"],
        test=loaded["test"],
        labels=spec.label_set([example for examples in loaded.values() for example in examples], rules.order),
        report=report,
    )
    report.extend(_summary(spec, splits, origin))
    return splits


def read_file_examples(path: str | Path, *, task: str, data: Any, limit: int | None = None) -> tuple[list, list[str]]:
    """One file read, cleaned and relabelled as a study's ``data:`` settings say for its splits, with its
    report lines: ``predict --evaluate`` reads a labelled input file so."""
    spec = get_task(task)
    check_format(spec, data.format)
    report: list[str] = []
    source = Source(Path(path))
    if data.format == "hf-disk":
        from llmflow_hpo.data.tables import folder_splits

        splits = folder_splits(path)
        if splits is not None:  # a folder of several splits: its test split, else its first
            source = Source(Path(path), "test" if "test" in splits else splits[0])
    return _read_split(source, limit, spec, data, LabelRules.of(data), report), report


def _read_split(
    source: Source, limit: int | None, task: BaseTask, data: Any, rules: LabelRules, report: list[str]
) -> list:
    """Read, clean and relabel one split's source, adding its report lines."""
    examples = read_file(source.path, task=task, data=data, split=source.split, limit=limit)
    limited = f" (limit {limit})" if limit is not None else ""
    report.append(f"{source.name}: read {plural(len(examples), task.unit)} from {source}{limited}")
    cleaned, lines = clean_examples(examples, source=source.name, normalize_unicode=data.normalize_unicode)
    report.extend(lines)
    relabelled, lines = task.relabel(cleaned, rules, data, str(source.path))
    report.extend(lines)
    return relabelled


def _overlaps(task: BaseTask, loaded: dict[str, list], *, dedupe: bool, report: list[str], origin: dict) -> None:
    """Report the inputs that occur in two splits (and repeats within one); with ``dedupe``, drop from train
    the examples whose input is in dev or test."""
    keys = {name: Counter(task.input_key(example) for example in loaded[name]) for name in SPLIT_NAMES}
    found = False
    for first, second in (("train", "dev"), ("train", "test"), ("dev", "test")):
        shared = keys[first].keys() & keys[second].keys()
        if shared:
            found = True
            ours, theirs = (sum(keys[name][k] for k in shared) for name in (first, second))
            report.append(
                f"overlap: {plural(len(shared), 'input')} in both {first} and {second} ({plural(ours, first + ' example')}, "
                f"{plural(theirs, second + ' example')}; the same input after cleaning)"
            )
    for name in SPLIT_NAMES:
        repeats = sum(count - 1 for count in keys[name].values() if count > 1)
        if repeats:
            report.append(f"repeats: {name} holds {plural(repeats, 'example')} whose input an earlier one has")
    held = keys["dev"].keys() | keys["test"].keys()
    if dedupe:
        before = len(loaded["train"])
        loaded["train"] = [example for example in loaded["train"] if task.input_key(example) not in held]
        dropped = before - len(loaded["train"])
        report.append(
            f"dedupe: dropped {plural(dropped, 'train example')} that occur in dev or test; "
            f"train keeps {len(loaded['train'])}"
        )
        if dropped:
            origin["train"] += f", less {dropped} that occur in dev or test"
    elif found:
        report.append("overlap: set data.dedupe: true to drop from train the examples that occur in dev or test")


# --------------------------------------------------------------------------------------- carving


def stratify_problem(labels: Sequence[str], held_out: float | int) -> str | None:
    """Why a stratified split of these labels is impossible, or None when it can be done.

    scikit-learn needs at least 2 examples per class, and both parts at least one example per class.
    """
    counts = Counter(labels)
    rare = sorted(label for label, count in counts.items() if count < 2)
    if rare:
        return f"label(s) {', '.join(map(repr, rare))} have fewer than 2 examples"
    n_held = _held_out_count(len(labels), held_out)
    if min(n_held, len(labels) - n_held) < len(counts):
        return f"{n_held} held-out of {len(labels)} examples cannot hold all {len(counts)} labels"
    return None


def split_examples(examples: list, *, fraction_or_count: float | int, seed: int, stratify: bool) -> tuple[list, list]:
    """Split off a held-out part; returns ``(rest, held_out)``, each in the original order.

    ``fraction_or_count`` is a fraction in (0, 1) or a count >= 1 (rounded up as scikit-learn
    does). The same seed gives the same split. ``stratify`` keeps the label proportions of
    ``TextExample`` lists; when ``stratify_problem`` finds that impossible, the split is plain.
    """
    from sklearn.model_selection import train_test_split

    if not examples:
        raise ValueError("cannot split an empty list of examples")
    n_held = _held_out_count(len(examples), fraction_or_count)
    if n_held >= len(examples):
        raise ValueError(f"cannot hold out {n_held} of {len(examples)} examples and keep any")
    labels = _stratify_labels(examples) if stratify else None
    if labels is not None and stratify_problem(labels, fraction_or_count) is not None:
        labels = None
    rest, held = train_test_split(
        list(range(len(examples))), test_size=n_held, random_state=seed, shuffle=True, stratify=labels
    )
    return [examples[i] for i in sorted(rest)], [examples[i] for i in sorted(held)]


def _held_out_count(total: int, fraction_or_count: float | int) -> int:
    if isinstance(fraction_or_count, bool):
        raise ValueError("fraction_or_count must be a number, not a bool")
    if isinstance(fraction_or_count, int):
        if fraction_or_count < 1:
            raise ValueError(f"a count to hold out must be 1 or more, got {fraction_or_count}")
        return fraction_or_count
    if not 0.0 < fraction_or_count < 1.0:
        raise ValueError(f"a fraction to hold out must be in (0, 1), got {fraction_or_count}")
    return math.ceil(fraction_or_count * total)


def _stratify_labels(examples: list) -> list[str]:
    labels = [getattr(example, "label", None) for example in examples]
    if not all(isinstance(label, str) for label in labels):
        raise ValueError("stratify applies to examples with one label each (text classification)")
    return labels


def _carve_missing(
    task: BaseTask,
    loaded: dict[str, list],
    amounts: dict[str, float | int],
    *,
    seed: int,
    train_path: Path,
    report: list[str],
    origin: dict[str, str],
) -> None:
    """Carve each split of ``amounts`` that has no source out of train, in that order (test, then dev)."""
    total = len(loaded["train"])
    for name, amount in amounts.items():
        if name not in loaded:
            loaded["train"], loaded[name] = _carve(
                task, loaded["train"], name, amount, total=total, seed=seed, train_path=train_path, report=report
            )
            share = f"{amount * 100:g}%" if isinstance(amount, float) else plural(amount, "example")
            origin[name] = f"carved from train ({share}, seed {seed})"
            origin["train"] += f", less {len(loaded[name])} carved for {name}"


def _carve(
    task: BaseTask,
    train: list,
    name: str,
    amount: float | int,
    *,
    total: int,
    seed: int,
    train_path: Path,
    report: list[str],
) -> tuple[list, list]:
    """Carve split ``name`` out of train; a fraction is of ``total``, the train size as read."""
    stratify = task.stratify
    how = "plain split"
    try:
        count = _held_out_count(total, amount)
        if stratify:
            problem = stratify_problem([example.label for example in train], count)
            how = "stratified by label" if problem is None else f"not stratified: {problem}"
        rest, held = split_examples(train, fraction_or_count=count, seed=seed, stratify=stratify)
    except ValueError as error:
        raise DataError(train_path, f"cannot carve a {name} split from train: {error}") from error
    share = f" ({amount * 100:g}% of the {total} read)" if isinstance(amount, float) else ""
    report.append(
        f"{name}: no file given, carved {plural(len(held), 'example')}{share} from train "
        f"(seed {seed}, {how}); train keeps {len(rest)}"
    )
    return rest, held


def _require_examples(name: str, examples: list, path: Path) -> None:
    if not examples:
        raise DataError(path, f"the {name} split has no examples left after reading and cleaning")


def _require_something_to_learn(task: BaseTask, examples: list, path: Path) -> None:
    """A train split with one label only (or NER tags that are all O) trains a model that learns nothing and
    scores perfectly or zero: train loss 0, accuracy 1.0. Refused before any study is created. A task without
    labels (causal-lm) learns the text itself."""
    if not task.labelled:
        return
    counts = Counter(label for example in examples for label in task.example_labels(example))
    problem = task.train_problem(counts)
    if problem is not None:
        raise DataError(path, problem)
    if len(counts) < 2:
        (only,) = counts
        raise DataError(
            path,
            f"the train split has one label only ({only!r}, {counts[only]} times): a model learns nothing from it "
            f"(train loss 0, accuracy 1.0); give examples of at least two labels, or check {task.label_field}",
        )


def _summary(task: BaseTask, splits: DataSplits, origin: dict[str, str]) -> list[str]:
    lines = [f"splits: train {len(splits.train)}, dev {len(splits.dev)}, test {len(splits.test)}"]
    lines += [f"{name}: {len(getattr(splits, name))} {origin[name]}" for name in SPLIT_NAMES]
    if task.labelled:
        lines.append(f"labels ({len(splits.labels)}): {', '.join(splits.labels)}")
    lines.extend(task.summary(splits))
    seen = _labels_of(task, splits.train)
    for name in ("dev", "test"):
        unseen = sorted(_labels_of(task, getattr(splits, name)) - seen)
        if unseen:
            lines.append(f"warning: {name} has label(s) never seen in train: {', '.join(unseen)}")
    return lines


def _labels_of(task: BaseTask, examples: list) -> set[str]:
    return {label for example in examples for label in task.example_labels(example)}
