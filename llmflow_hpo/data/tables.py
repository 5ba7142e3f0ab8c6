"""Tables read by Hugging Face ``datasets``: Parquet, Arrow and JSON files through its builders, and folders
written by ``save_to_disk``.

A file is loaded by its builder (``load_dataset("parquet", ...)``) into a cache folder of its own under the
system's temporary folder, removed once the rows are read: nothing is written beside the data or into the
user's Hugging Face cache, and no torch is imported (a streamed ``IterableDataset`` would import it). A
``save_to_disk`` folder is memory-mapped as it is (``load_from_disk``). Each row is a record, made into the
task's example by ``BaseTask.record_example``; a class-label column (``ClassLabel``, or a list of them such as
the ``ner_tags`` of Hugging Face's CoNLL-2003) gives its label names, not its ids.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmflow_hpo.errors import DataError
from llmflow_hpo.tasks import BaseTask
from llmflow_hpo.tasks.base import record_fields

__all__ = ["DEV_SPLIT_NAMES", "TABLE_FORMATS", "folder_splits", "read_table", "table_rows"]

TABLE_FORMATS: tuple[str, ...] = ("json", "parquet", "arrow", "hf-disk")

#: The split of a save_to_disk folder that is dev when data.splits names none (the first the folder has).
DEV_SPLIT_NAMES: tuple[str, ...] = ("validation", "dev", "valid")


def folder_splits(path: str | Path) -> list[str] | None:
    """The splits of a ``save_to_disk`` folder of a ``DatasetDict`` (its ``dataset_dict.json``), or None for a
    folder of one ``Dataset``; read without importing datasets. Raises DataError for any other folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(path, "format hf-disk reads a folder written by datasets' save_to_disk; this is not a folder")
    index = folder / "dataset_dict.json"
    if index.is_file():
        try:
            return list(json.loads(index.read_text())["splits"])
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(index, f"not a datasets split index ({error})") from None
    if (folder / "state.json").is_file():
        return None
    raise DataError(path, "not a folder written by datasets' save_to_disk (no dataset_dict.json or state.json in it)")


def read_table(
    path: str | Path, *, task: BaseTask, data: Any, split: str | None = None, limit: int | None = None
) -> list:
    """The examples of a Parquet, Arrow or JSON file, or of a ``save_to_disk`` folder (``split``: which of its
    splits, for a folder of several), the first ``limit`` rows."""
    fields = record_fields(data)
    task.check_record_fields(fields)
    examples = []
    for number, record in table_rows(Path(path), data, split=split, limit=limit):
        examples.append(task.record_example(path, f"row {number}", record, fields))
    return examples


def table_rows(
    path: Path, data: Any, *, split: str | None = None, limit: int | None = None
) -> Iterator[tuple[int, dict]]:
    """The rows of a table in ``data.format`` as records, numbered from 1, class-label ids as their names."""
    with _read_errors(path, data.format), tempfile.TemporaryDirectory(prefix="llmflow-datasets-") as scratch:
        rows = _folder(path, split) if data.format == "hf-disk" else _built(path, data, scratch)
        names = _class_names(rows.features)
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        for number, row in enumerate(rows, start=1):
            yield number, _named(row, names)


def _folder(path: Path, split: str | None) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(path, f"no split {split!r} in the folder (splits: {', '.join(loaded)}); set data.splits")
        return loaded[split]
    return loaded


def _built(path: Path, data: Any, scratch: str) -> Any:
    """The file as a Dataset, built by the datasets builder of its format into ``scratch``, quietly."""
    import datasets

    if not path.is_file():
        raise DataError(path, "no such file" if not path.exists() else "not a file")
    options = {"field": data.json_field} if data.format == "json" and data.json_field else {}
    shown = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        return datasets.load_dataset(
            data.format, data_files={"rows": str(path)}, split="rows", cache_dir=scratch, **options
        )
    finally:
        datasets.logging.set_verbosity(verbosity)
        if shown:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _read_errors(path: Path, format: str) -> Iterator[None]:
    """A file the library cannot read as ``format`` becomes a DataError with the library's reason."""
    import datasets
    import pyarrow

    try:
        yield
    except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError, ValueError, OSError) as error:
        if isinstance(error, DataError):
            raise
        cause = error.__cause__ or error
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise DataError(path, f"cannot be read as {format}: {reason[:300]}") from None


def _class_names(features: Any) -> dict[str, list[str]]:
    """The label names of each class-label column (or list of class labels) of a table's features."""
    import datasets

    names: dict[str, list[str]] = {}
    for column, feature in (features or {}).items():
        inner = getattr(feature, "feature", None) if not isinstance(feature, datasets.ClassLabel) else feature
        if isinstance(inner, datasets.ClassLabel):
            names[column] = list(inner.names)
    return names


def _named(row: dict, names: dict[str, list[str]]) -> dict:
    """A row with the ids of its class-label columns replaced by their names."""
    for column, labels in names.items():
        value = row.get(column)
        if isinstance(value, int) and 0 <= value < len(labels):
            row[column] = labels[value]
        elif isinstance(value, list):
            row[column] = [labels[v] if isinstance(v, int) and 0 <= v < len(labels) else v for v in value]
    return row
