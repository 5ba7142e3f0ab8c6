"""Read, clean and split the examples of a study: the data arrow before any tokenizer is involved.

Three readers turn files into examples (``read_conll``, ``read_delimited``, ``read_jsonl``),
``clean_examples`` normalises their text, ``split_examples`` carves a held-out split, and
``load_splits`` runs them all for a study and says in ``DataSplits.report`` what it did.

No torch, no transformers: a tokenizer meets the data only in the training recipe. Every problem
with a file is a ``DataError`` naming the file (and the line, where there is one); nothing is
dropped or changed without a report line that says so.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmflow_hpo.errors import ConfigError, DataError
from llmflow_hpo.tasks import BaseTask, get_task
from llmflow_hpo.tasks.text_classification import TextExample
from llmflow_hpo.tasks.token_classification import TokenExample

__all__ = [
    "DataFormat",
    "DataSplits",
    "TextExample",
    "TokenExample",
    "clean_examples",
    "load_splits",
    "read_conll",
    "read_delimited",
    "read_file_examples",
    "read_jsonl",
    "split_examples",
    "stratify_problem",
]

DataFormat = Literal["conll", "csv", "tsv", "jsonl", "text"]

SPLIT_NAMES: tuple[str, ...] = ("train", "dev", "test")
UNICODE_FORMS: tuple[str, ...] = ("NFC", "NFD", "NFKC", "NFKD")
DOCSTART = "-DOCSTART-"
_BOM = "\ufeff"
_WHITESPACE_RUN = re.compile(r"\s+")
_COLUMN_SEPARATOR = re.compile(r"[ \t]+")


@dataclass
class DataSplits:
    """The train, dev and test examples of a study, their label set, and what was done to get them."""

    train: list = field(metadata={"help": "training examples (the example class of the study's task)"})
    dev: list = field(metadata={"help": "examples scored during the search"})
    test: list = field(metadata={"help": "examples kept for the final evaluation of the best trial"})
    labels: list[str] = field(
        metadata={"help": 'NER: every tag seen, "O" first then sorted; classification: sorted labels'}
    )
    report: list[str] = field(metadata={"help": "human-readable lines: what was read, removed, normalised and split"})


# --------------------------------------------------------------------------------------- readers


def read_conll(
    path: str | Path,
    *,
    token_column: int = 0,
    tag_column: int = -1,
    encoding: str = "utf-8",
    limit: int | None = None,
) -> list[TokenExample]:
    """Read a CoNLL column file: one word per line, a blank line ends a sentence.

    Columns are separated by spaces or tabs (only ASCII ones, so a no-break space inside a word
    stays in the word for ``clean_examples`` to deal with). ``-DOCSTART-`` lines are skipped with
    the empty sentence they leave. ``limit`` keeps the first N sentences.
    """
    _check_limit(limit)
    examples: list[TokenExample] = []
    tokens: list[str] = []
    tags: list[str] = []
    first: tuple[int, int] | None = None  # (line number, column count) of the file's first word line
    for number, line in _numbered_lines(path, encoding):
        if limit is not None and len(examples) >= limit:
            break
        columns = _COLUMN_SEPARATOR.split(line.strip(" \t\r\n"))
        if columns == [""]:
            if tokens:
                examples.append(TokenExample(tuple(tokens), tuple(tags)))
            tokens, tags = [], []
        elif columns[0] == DOCSTART:
            continue
        else:
            first = first or (number, len(columns))
            if len(columns) != first[1]:
                # A missing or extra column (a word with a space in it, a lost tag) would shift which
                # column is the tag: refuse it rather than read the wrong column.
                raise DataError(
                    path,
                    f"line {number}: {len(columns)} column(s) {columns!r}, but line {first[0]} has {first[1]}; "
                    "every word line needs the same columns (a word may not contain a space or tab)",
                )
            token, tag = _conll_fields(path, number, columns, token_column, tag_column)
            tokens.append(token)
            tags.append(tag)
    if tokens and (limit is None or len(examples) < limit):
        examples.append(TokenExample(tuple(tokens), tuple(tags)))
    return examples


def _conll_fields(
    path: str | Path, number: int, columns: list[str], token_column: int, tag_column: int
) -> tuple[str, str]:
    """Pick the word and the tag out of one CoNLL line, or say why the line cannot give them."""
    width = len(columns)
    token_index = token_column if token_column >= 0 else width + token_column
    tag_index = tag_column if tag_column >= 0 else width + tag_column
    if width < 2 or not (0 <= token_index < width and 0 <= tag_index < width):
        raise DataError(
            path,
            f"line {number}: {width} column(s) {columns!r}, too few for token column "
            f"{token_column} and tag column {tag_column}",
        )
    if token_index == tag_index:
        raise DataError(path, f"line {number}: token column {token_column} and tag column {tag_column} are the same")
    return columns[token_index], columns[tag_index]


def read_delimited(
    path: str | Path,
    *,
    delimiter: str,
    text_column: str | int,
    label_column: str | int | None,
    header: bool = True,
    encoding: str = "utf-8",
    limit: int | None = None,
) -> list[TextExample]:
    """Read a CSV or TSV file of texts and labels; columns by header name or 0-based index.

    A tab delimiter reads with ``csv.QUOTE_NONE``: in TSV files such as SST-2 a quote is text, not
    quoting. ``limit`` keeps the first N rows; blank rows are skipped.
    """
    _check_limit(limit)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    examples: list[TextExample] = []
    with _open_text(path, encoding) as handle, _any_field_size():
        # strict: a broken quote is an error at its line, never a field that swallows the rows after it
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting, strict=True)
        rows = _decoded_rows(path, reader)
        names = _strip_bom(next(rows, [])) if header else []
        if label_column is None:
            raise DataError(path, _unlabelled_message(names))
        text_index = _column_index(path, text_column, names, header)
        label_index = _column_index(path, label_column, names, header, hint=_LABEL_HINT)
        for row in rows:
            if limit is not None and len(examples) >= limit:
                break
            if not row:
                continue
            examples.append(_delimited_example(path, reader.line_num, row, text_index, label_index))
    return examples


@contextlib.contextmanager
def _any_field_size() -> Iterator[None]:
    """Let csv read a field of any length (its default limit is 131,072 characters): a long text is read
    whole and then truncated to data.max_length by the tokenizer, as any other long text."""
    previous = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # the largest the C long of every platform holds
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _decoded_rows(path: str | Path, reader: Any) -> Iterator[list[str]]:
    """Rows of a csv reader, with decoding and csv errors turned into DataError (with the line)."""
    try:
        yield from reader
    except UnicodeDecodeError as error:
        raise DataError(path, _decode_message(error)) from error
    except csv.Error as error:
        hint = " (a quoted field is never closed)" if "end of data" in str(error) else ""
        raise DataError(path, f"line {reader.line_num}: not valid delimited text: {error}{hint}") from error


def _unlabelled_message(names: list[str]) -> str:
    found = f" (columns found: {', '.join(names)})" if names else ""
    return (
        "no label column given: this split has no labels, but train, dev and test all need "
        f"labels to train and score a model{found}"
    )


_LABEL_HINT = "; an unlabelled file (such as the GLUE test split) cannot serve as train, dev or test"


def _column_index(path: str | Path, column: str | int, names: list[str], header: bool, hint: str = "") -> int:
    """The 0-based index of a column given by header name or index (index checked per row)."""
    if isinstance(column, int):
        if column < 0:
            raise DataError(path, f"column index {column} must be 0 or more")
        if header and column >= len(names):
            raise DataError(path, f"no column {column}: {_columns_found(names)}{hint}")
        return column
    if not header:
        raise DataError(path, f"column {column!r} is given by name but the file has no header; give its index")
    stripped = [name.strip() for name in names]
    if column not in stripped:
        raise DataError(path, f"no column {column!r}: {_columns_found(names)}{hint}")
    return stripped.index(column)


def _columns_found(names: list[str]) -> str:
    if not names:
        return "the file is empty"
    listed = ", ".join(f"{index}={name!r}" for index, name in enumerate(names))
    return f"columns found: {listed}"


def _delimited_example(path: str | Path, number: int, row: list[str], text_index: int, label_index: int) -> TextExample:
    needed = max(text_index, label_index) + 1
    if len(row) < needed:
        raise DataError(path, f"line {number}: {len(row)} column(s), need at least {needed}")
    return TextExample(text=row[text_index], label=row[label_index])


def read_jsonl(
    path: str | Path,
    *,
    task: str,
    text_field: str = "text",
    label_field: str = "label",
    tokens_field: str = "tokens",
    tags_field: str = "tags",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    encoding: str = "utf-8",
    limit: int | None = None,
) -> list:
    """Read one JSON object per line: the task's example from each (``BaseTask.jsonl_example``).

    Tokens and tags for NER, text and label for classification, a prompt and completion, a chat or a text for
    causal-lm. Labels may be JSON strings, numbers or booleans and become strings; tags must be strings (integer
    tag ids carry no names). ``limit`` keeps the first N objects; blank lines are skipped.
    """
    spec = get_task(task)
    _check_limit(limit)
    fields = {
        "text": text_field,
        "label": label_field,
        "tokens": tokens_field,
        "tags": tags_field,
        "prompt": prompt_field,
        "completion": completion_field,
        "messages": messages_field,
    }
    examples: list = []
    for number, line in _numbered_lines(path, encoding):
        if limit is not None and len(examples) >= limit:
            break
        if not line.strip():
            continue
        examples.append(spec.jsonl_example(path, number, _json_object(path, number, line), fields))
    return examples


def read_text_lines(path: str | Path, *, task: str, encoding: str = "utf-8", limit: int | None = None) -> list:
    """Read a plain text file: the task's example from each line (``BaseTask.line_example``), line ends
    removed; blank lines are skipped. ``limit`` keeps the first N lines read."""
    spec = get_task(task)
    _check_limit(limit)
    examples: list = []
    for number, line in _numbered_lines(path, encoding):
        if limit is not None and len(examples) >= limit:
            break
        text = line.rstrip("\r\n")
        if text.strip():
            examples.append(spec.line_example(path, number, text))
    return examples


def _json_object(path: str | Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(path, f"line {number}: not valid JSON ({error.msg})") from error
    except RecursionError:
        raise DataError(path, f"line {number}: JSON nested too deeply to be an example") from None
    if not isinstance(record, dict):
        raise DataError(path, f"line {number}: expected a JSON object, got {type(record).__name__}")
    return record


def _open_text(path: str | Path, encoding: str):
    """Open a data file for reading, with a DataError for a missing file or unknown encoding."""
    file = Path(path)
    if not file.is_file():
        raise DataError(path, "no such file" if not file.exists() else "not a file")
    try:
        return file.open(encoding=encoding, newline="")
    except LookupError as error:
        raise DataError(path, f"unknown encoding {encoding!r}") from error


def _numbered_lines(path: str | Path, encoding: str) -> Iterator[tuple[int, str]]:
    """Lines of a text file with their 1-based numbers, a leading byte-order mark removed."""
    with _open_text(path, encoding) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                yield number, line.removeprefix(_BOM) if number == 1 else line
        except UnicodeDecodeError as error:
            raise DataError(path, _decode_message(error)) from error


def _decode_message(error: UnicodeDecodeError) -> str:
    return (
        f"cannot decode as {error.encoding} (byte {error.start}: {error.reason}); "
        "set the encoding option to the file's encoding"
    )


def _strip_bom(names: list[str]) -> list[str]:
    return [names[0].removeprefix(_BOM), *names[1:]] if names else names


# --------------------------------------------------------------------------------------- cleaning


def clean_examples(examples: list, *, source: str, normalize_unicode: str | None = "NFC") -> tuple[list, list[str]]:
    """Normalise Unicode and whitespace, drop what ends up empty, and report every change.

    Text, words, tags and labels get Unicode form ``normalize_unicode`` (None keeps them as they
    are), then runs of whitespace (a no-break space included) become one space and the ends are
    stripped. NER words that become empty are dropped with their tag; examples that become empty
    (no words, no text, or no label) are dropped. ``normalize_unicode="none"`` is the same as None. Returns the clean examples and report lines, each
    starting with ``source``.
    """
    form = _unicode_form(normalize_unicode)
    counts: Counter[str] = Counter()
    cleaned = []
    clean = _Cleaner(form, counts)
    for number, example in enumerate(examples, start=1):
        clean.changes = _Changes()
        result = example.cleaned(clean, source, number)  # each task's example class cleans itself (tasks/)
        if result is not None:
            clean.kept()
            cleaned.append(result)
    return cleaned, _cleaning_report(source, len(examples), form, counts)


def _unicode_form(normalize_unicode: str | None) -> str | None:
    """The unicodedata form to apply; None (or "none", as in a study config) applies none."""
    if normalize_unicode is None or normalize_unicode.lower() == "none":
        return None
    if normalize_unicode not in UNICODE_FORMS:
        raise ValueError(f"normalize_unicode must be one of {', '.join(UNICODE_FORMS)}, 'none' or None")
    return normalize_unicode


@dataclass
class _Changes:
    """What cleaning did to one string (or, or-ed together, to one example)."""

    unicode: bool = False
    ends: bool = False
    runs: bool = False

    def __ior__(self, other: _Changes) -> _Changes:
        self.unicode |= other.unicode
        self.ends |= other.ends
        self.runs |= other.runs
        return self


def _clean_string(value: str, form: str | None) -> tuple[str, _Changes]:
    """The string in Unicode form ``form``, stripped, with whitespace runs made one space."""
    normalised = unicodedata.normalize(form, value) if form else value
    stripped = normalised.strip()
    collapsed = _WHITESPACE_RUN.sub(" ", stripped)
    return collapsed, _Changes(normalised != value, stripped != normalised, collapsed != stripped)


class _Cleaner:
    """The ``tasks.base.Cleaner`` that ``clean_examples`` hands each example: it cleans its strings and notes
    what changed, to be counted if the example is kept."""

    def __init__(self, form: str | None, counts: Counter[str]) -> None:
        self.form = form
        self.counts = counts
        self.changes = _Changes()

    def __call__(self, value: str) -> str:
        cleaned, changes = _clean_string(value, self.form)
        self.changes |= changes
        return cleaned

    def count(self, what: str) -> None:
        self.counts[what] += 1

    def kept(self) -> None:
        """Count what cleaning did to the example just kept."""
        self.counts["unicode"] += self.changes.unicode
        self.counts["ends"] += self.changes.ends
        self.counts["runs"] += self.changes.runs


def _cleaning_report(source: str, total: int, form: str | None, counts: Counter[str]) -> list[str]:
    lines = []
    if counts["unicode"]:
        lines.append(f"{source}: normalised Unicode to {form} in {_n(counts['unicode'], 'example')}")
    if counts["ends"]:
        lines.append(f"{source}: stripped whitespace from the ends of strings in {_n(counts['ends'], 'example')}")
    if counts["runs"]:
        lines.append(
            f"{source}: made runs of whitespace (no-break spaces included) one space in {_n(counts['runs'], 'example')}"
        )
    if counts["empty_tokens"]:
        lines.append(
            f"{source}: dropped {_n(counts['empty_tokens'], 'word')} (with their tags) that were empty after cleaning"
        )
    if counts["empty"]:
        lines.append(f"{source}: dropped {_n(counts['empty'], 'empty example')}")
    if counts["no_label"]:
        lines.append(f"{source}: dropped {_n(counts['no_label'], 'example')} with an empty label")
    kept = total - counts["empty"] - counts["no_label"]
    if not lines:
        return [f"{source}: {_n(total, 'example')}, nothing to clean"]
    return [*lines, f"{source}: kept {kept} of {_n(total, 'example')} after cleaning"]


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# --------------------------------------------------------------------------------------- splitting


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


# --------------------------------------------------------------------------------------- a study's data


def load_splits(
    *,
    task: str,
    format: DataFormat,
    train: Path,
    dev: Path | None,
    test: Path | None,
    limits: dict[str, int | None],
    token_column: int = 0,
    tag_column: int = -1,
    text_column: str | int = "text",
    label_column: str | int = "label",
    header: bool = True,
    encoding: str = "utf-8",
    tokens_field: str = "tokens",
    tags_field: str = "tags",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    normalize_unicode: str | None = "NFC",
    split_dev: float | int = 0.1,
    split_test: float | int = 0.1,
    seed: int = 0,
) -> DataSplits:
    """Read, clean and (where dev or test is missing) carve the three splits of a study.

    ``limits["train"|"dev"|"test"]`` keeps the first N examples of that file. A missing test split
    is carved from train first, then a missing dev split; a fraction is of the train examples as
    read and cleaned. Classification splits are stratified by label when possible.
    """
    spec = get_task(task)
    _check_format(spec, format)
    unknown = sorted(set(limits) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"unknown split(s) in limits: {', '.join(unknown)}")
    options = _ReadOptions(
        task=spec,
        format=format,
        token_column=token_column,
        tag_column=tag_column,
        text_column=text_column,
        label_column=label_column,
        tokens_field=tokens_field,
        tags_field=tags_field,
        prompt_field=prompt_field,
        completion_field=completion_field,
        messages_field=messages_field,
        header=header,
        encoding=encoding,
        normalize_unicode=normalize_unicode,
    )
    report: list[str] = []
    paths = {"train": train, "dev": dev, "test": test}
    loaded = {
        name: _read_split(path, limits.get(name), options, report) for name, path in paths.items() if path is not None
    }
    _require_examples("train", loaded["train"], train)
    _carve_missing(spec, loaded, {"test": split_test, "dev": split_dev}, seed=seed, train_path=train, report=report)
    for name in SPLIT_NAMES:
        _require_examples(name, loaded[name], paths[name] or train)
    _require_something_to_learn(spec, loaded["train"], train)
    splits = DataSplits(
        train=loaded["train"],
        dev=loaded["dev"],
        test=loaded["test"],
        labels=spec.label_set([example for examples in loaded.values() for example in examples]),
        report=report,
    )
    report.extend(_summary(spec, splits))
    return splits


@dataclass(frozen=True)
class _ReadOptions:
    """How load_splits reads every file of a study (its keyword arguments, gathered once)."""

    task: BaseTask
    format: str
    token_column: int
    tag_column: int
    text_column: str | int
    label_column: str | int
    tokens_field: str
    tags_field: str
    prompt_field: str
    completion_field: str
    messages_field: str
    header: bool
    encoding: str
    normalize_unicode: str | None


def read_file_examples(path: str | Path, *, task: str, data: Any, limit: int | None = None) -> tuple[list, list[str]]:
    """One file read and cleaned as a study's ``data:`` settings (``config.study.DataConfig``) say for its
    splits, with its report lines: ``predict --evaluate`` reads a labelled input file so."""
    spec = get_task(task)
    _check_format(spec, data.format)
    options = _ReadOptions(
        task=spec,
        format=data.format,
        token_column=data.token_column,
        tag_column=data.tag_column,
        text_column=data.text_column,
        label_column=data.label_column,
        tokens_field=data.tokens_field,
        tags_field=data.tags_field,
        prompt_field=data.prompt_field,
        completion_field=data.completion_field,
        messages_field=data.messages_field,
        header=data.header,
        encoding=data.encoding,
        normalize_unicode=None if data.normalize_unicode == "none" else data.normalize_unicode,
    )
    report: list[str] = []
    return _read_split(Path(path), limit, options, report), report


def _read_split(path: Path, limit: int | None, options: _ReadOptions, report: list[str]) -> list:
    """Read and clean one split file, adding its report lines."""
    examples = _read_file(path, limit, options)
    limited = f" (limit {limit})" if limit is not None else ""
    report.append(f"{Path(path).name}: read {_n(len(examples), options.task.unit)} from {path}{limited}")
    cleaned, lines = clean_examples(examples, source=Path(path).name, normalize_unicode=options.normalize_unicode)
    report.extend(lines)
    return cleaned


def _read_file(path: Path, limit: int | None, options: _ReadOptions) -> list:
    if options.format == "conll":
        return read_conll(
            path,
            token_column=options.token_column,
            tag_column=options.tag_column,
            encoding=options.encoding,
            limit=limit,
        )
    if options.format == "jsonl":
        return _read_jsonl_split(path, limit, options)
    if options.format == "text":
        return read_text_lines(path, task=options.task.name, encoding=options.encoding, limit=limit)
    return read_delimited(
        path,
        delimiter="\t" if options.format == "tsv" else ",",
        text_column=options.text_column,
        label_column=options.label_column,
        header=options.header,
        encoding=options.encoding,
        limit=limit,
    )


def _read_jsonl_split(path: Path, limit: int | None, options: _ReadOptions) -> list:
    """JSON Lines: the task says which of the column options must be field names."""
    options.task.check_jsonl_fields(
        {
            "text_column": options.text_column,
            "label_column": options.label_column,
            "tokens_field": options.tokens_field,
            "tags_field": options.tags_field,
        }
    )
    return read_jsonl(
        path,
        task=options.task.name,
        text_field=str(options.text_column),
        label_field=str(options.label_column),
        tokens_field=options.tokens_field,
        tags_field=options.tags_field,
        prompt_field=options.prompt_field,
        completion_field=options.completion_field,
        messages_field=options.messages_field,
        encoding=options.encoding,
        limit=limit,
    )


def _carve_missing(
    task: BaseTask,
    loaded: dict[str, list],
    amounts: dict[str, float | int],
    *,
    seed: int,
    train_path: Path,
    report: list[str],
) -> None:
    """Carve each split of ``amounts`` that has no file out of train, in that order (test, then dev)."""
    total = len(loaded["train"])
    for name, amount in amounts.items():
        if name not in loaded:
            loaded["train"], loaded[name] = _carve(
                task, loaded["train"], name, amount, total=total, seed=seed, train_path=train_path, report=report
            )


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
        f"{name}: no file given, carved {_n(len(held), 'example')}{share} from train "
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


def _summary(task: BaseTask, splits: DataSplits) -> list[str]:
    lines = [f"splits: train {len(splits.train)}, dev {len(splits.dev)}, test {len(splits.test)}"]
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


# --------------------------------------------------------------------------------------- checks


def _check_format(task: BaseTask, format: str) -> None:
    if format not in task.formats:
        raise ConfigError(f"format {format!r} does not fit task {task.name!r}; use one of {', '.join(task.formats)}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
