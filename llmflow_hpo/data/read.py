"""Read a data file into the examples of a study's task: the data arrow before cleaning, labels and splits.

``read_file`` reads one file (or one split of a ``save_to_disk`` folder) as the study's ``data:`` settings say.
Text files are read here, line by line (``read_conll``, ``read_delimited``, ``read_lines``, ``read_jsonl``,
``read_text_lines``), so that every problem names its line and an undecodable byte its line and offset.
Parquet, Arrow, JSON documents and ``save_to_disk`` folders are read by Hugging Face ``datasets``
(``data.tables``). CSV stays a reader of ours: the datasets builder reads CSV through pandas, which turns
``NA`` or ``null`` texts into missing values, guesses column types, and names no line or byte of a bad row.

No torch, no transformers: a tokenizer meets the data only in the training recipe.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from llmflow_hpo.errors import ConfigError, DataError
from llmflow_hpo.tasks import BaseTask, get_task
from llmflow_hpo.tasks.base import record_fields
from llmflow_hpo.tasks.text_classification import TextExample
from llmflow_hpo.tasks.token_classification import TokenExample

__all__ = [
    "TEXT_FORMATS",
    "DataFormat",
    "TextExample",
    "TokenExample",
    "check_format",
    "decode_message",
    "read_conll",
    "read_delimited",
    "read_file",
    "read_jsonl",
    "read_lines",
    "read_text_lines",
]

DataFormat = Literal["conll", "csv", "tsv", "jsonl", "lines", "text", "json", "parquet", "arrow", "hf-disk"]
TEXT_FORMATS: tuple[str, ...] = ("conll", "csv", "tsv", "jsonl", "lines", "text")

DOCSTART = "-DOCSTART-"
_BOM = "\ufeff"
_COLUMN_SEPARATOR = re.compile(r"[ \t]+")


def read_file(
    path: str | Path, *, task: BaseTask, data: Any, split: str | None = None, limit: int | None = None
) -> list:
    """The examples of one file in ``data.format`` (``data``: a ``config.study.DataConfig``), as read, before
    cleaning; ``split``: the split of a ``save_to_disk`` folder of several. ``limit`` keeps the first N."""
    check_format(task, data.format)
    if data.format not in TEXT_FORMATS:
        from llmflow_hpo.data.tables import read_table

        return read_table(path, task=task, data=data, split=split, limit=limit)
    if data.format == "conll":
        return read_conll(
            path, token_column=data.token_column, tag_column=data.tag_column, encoding=data.encoding, limit=limit
        )
    if data.format == "jsonl":
        fields = record_fields(data)
        task.check_record_fields(fields)
        return _read_records(path, task, fields, encoding=data.encoding, limit=limit)
    if data.format == "text":
        return read_text_lines(path, task=task.name, encoding=data.encoding, limit=limit)
    if data.format == "lines":
        return read_lines(
            path,
            separator=data.separator,
            label_position=data.label_position,
            split_at=data.split_at,
            encoding=data.encoding,
            limit=limit,
        )
    return read_delimited(
        path,
        delimiter="\t" if data.format == "tsv" else (data.delimiter or ","),
        text_column=data.text_column,
        label_column=data.label_column,
        header=data.header,
        encoding=data.encoding,
        limit=limit,
    )


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
        rows = _decoded_rows(path, reader, encoding)
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


def _decoded_rows(path: str | Path, reader: Any, encoding: str) -> Iterator[list[str]]:
    """Rows of a csv reader, with decoding and csv errors turned into DataError (with the line)."""
    try:
        yield from reader
    except UnicodeDecodeError as error:
        raise DataError(path, decode_message(path, encoding, error)) from error
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
    """Read one JSON object per line: the task's example from each (``BaseTask.record_example``).

    Tokens and tags for NER, text and label for classification, a prompt and completion, a chat or a text for
    causal-lm. Labels may be JSON strings, numbers or booleans and become strings; tags must be strings (integer
    tag ids carry no names). ``limit`` keeps the first N objects; blank lines are skipped.
    """
    fields = {
        "text": text_field,
        "label": label_field,
        "tokens": tokens_field,
        "tags": tags_field,
        "prompt": prompt_field,
        "completion": completion_field,
        "messages": messages_field,
    }
    return _read_records(path, get_task(task), fields, encoding=encoding, limit=limit)


def _read_records(
    path: str | Path, spec: BaseTask, fields: dict[str, Any], *, encoding: str, limit: int | None
) -> list:
    """The task's example of each JSON object line, by the field names of ``fields`` (``record_fields``)."""
    _check_limit(limit)
    examples: list = []
    for number, line in _numbered_lines(path, encoding):
        if limit is not None and len(examples) >= limit:
            break
        if not line.strip():
            continue
        examples.append(spec.record_example(path, f"line {number}", _json_object(path, number, line), fields))
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


def read_lines(
    path: str | Path,
    *,
    separator: str,
    label_position: Literal["start", "end"] = "end",
    split_at: Literal["first", "last"] | None = None,
    encoding: str = "utf-8",
    limit: int | None = None,
) -> list[TextExample]:
    """Read lines that hold a text and its label, split by ``separator`` (``LABEL:sub text`` with " " at the
    start, ``sentence@label`` with "@" at the end). ``split_at`` says which occurrence of the separator splits;
    by default the one nearest the label, so the text may hold the separator. Line ends (LF or CRLF) are
    removed; blank lines are skipped."""
    _check_limit(limit)
    first = (split_at or ("first" if label_position == "start" else "last")) == "first"
    examples: list[TextExample] = []
    for number, line in _numbered_lines(path, encoding):
        if limit is not None and len(examples) >= limit:
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        at = text.find(separator) if first else text.rfind(separator)
        if at < 0:
            raise DataError(
                path,
                f"line {number}: no {separator!r} (data.separator) splits the text from the label in {text[:60]!r}",
            )
        left, right = text[:at], text[at + len(separator) :]
        label, body = (left, right) if label_position == "start" else (right, left)
        examples.append(TextExample(text=body, label=label))
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
            raise DataError(path, decode_message(path, encoding, error)) from error


def decode_message(path: str | Path, encoding: str, error: UnicodeDecodeError) -> str:
    """Where a file stops decoding (line, byte of the file, the byte's value) and the option that fixes it."""
    line, offset, value = _undecodable(Path(path), encoding)
    where = f"line {line}, byte {offset} (0x{value:02x})" if line else f"byte {error.start}"
    return (
        f"{where}: cannot decode as {encoding} ({error.reason}); set data.encoding to the file's encoding "
        "(e.g. latin-1 or cp1252 for Western European text that is not UTF-8)"
    )


def _undecodable(path: Path, encoding: str) -> tuple[int, int, int]:
    """The 1-based line, the 0-based byte offset in the file and the value of the first byte that ``encoding``
    cannot decode; zeros when no line on its own shows it (a multi-byte encoding such as UTF-16)."""
    import codecs

    decoder = codecs.getincrementaldecoder(encoding)()
    start = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                decoder.decode(raw)
            except UnicodeDecodeError as error:
                return number, start + error.start, raw[error.start]
            start += len(raw)
    return 0, 0, 0


def _strip_bom(names: list[str]) -> list[str]:
    return [names[0].removeprefix(_BOM), *names[1:]] if names else names


def check_format(task: BaseTask, format: str) -> None:
    if format not in task.formats:
        raise ConfigError(f"format {format!r} does not fit task {task.name!r}; use one of {', '.join(task.formats)}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
