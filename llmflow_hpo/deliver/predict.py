"""``llmflow-hpo predict``: a model folder's predictions for a file (or stdin), and the ``Predictor`` that
``serve`` shares.

The input is read in the model's training format (``data.format`` of its study, or ``--format``): CoNLL,
CSV/TSV, JSON Lines, or plain text lines (one text each). A file that carries gold labels is read by the
training readers and cleaned as training data was (``data.splits.read_file_examples``), so ``--evaluate`` scores
exactly what retrain-best scored; an unlabelled file gives the texts (or words, or prompts) only. Each task
decodes its own predictions (``BaseTask.predict``): NER entities as spans with the word tags, a class with
every class's probability, a causal LM's generated completion.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from llmflow_hpo.deliver.model_folder import ModelFolder
from llmflow_hpo.errors import DataError, LlmflowError

__all__ = ["PredictOptions", "PredictResult", "Predictor", "read_inputs", "run_predict", "write_records"]

Runtime = Literal["torch", "onnx"]


@dataclass(frozen=True)
class PredictOptions:
    """How inputs are run: tokens kept per input, inputs per batch, a causal LM's answer length."""

    max_length: int
    batch_size: int = 32
    max_new_tokens: int = 64


class Predictor:
    """A model folder loaded once for predictions: its task, tokenizer and engine (PyTorch or ONNX)."""

    def __init__(
        self,
        folder: ModelFolder,
        *,
        runtime: Runtime = "torch",
        quantized: bool = False,
        device: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        progress: bool = False,
    ) -> None:
        from llmflow_hpo.deliver.engines import OnnxEngine, TorchEngine

        self.folder = folder
        self.task = folder.task
        self.cfg = folder.cfg
        hp = folder.hp
        self.options = PredictOptions(
            max_length=max_length or self.cfg.data.max_length,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens or self.cfg.generation.max_new_tokens,
        )
        self.tokenizer = folder.load_tokenizer()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        pad_id = int(pad or 0)
        if runtime == "onnx":
            if not self.task.onnx_runtime:
                raise LlmflowError(f"--runtime onnx: task {self.task.name} generates its answers; use --runtime torch")
            variant = "int8" if quantized else "fp32"
            self.engine: Any = OnnxEngine(folder.onnx_path(variant), pad_id, hp.num_threads, progress)
            self.runtime_name = f"onnx-{variant}"
            return
        import torch

        from llmflow_hpo.recipe.runtime import resolve_device, resolve_runtime

        if hp.num_threads is not None:
            torch.set_num_threads(hp.num_threads)
        run = resolve_runtime(hp, resolve_device(device or hp.device))
        self.engine = TorchEngine(folder.load_model(run.device), run, pad_id, progress)
        self.runtime_name = f"torch-{run.device.type}-{run.precision}"

    def parse(self, value: Any) -> Any:
        """One input (a request's item, a line's text); ValueError with the reason when it is not one."""
        return self.task.parse_input(value, self.cfg.data)

    def predict(self, inputs: list) -> list[dict[str, Any]]:
        """The records of ``inputs`` (of ``parse``), in their order."""
        if not inputs:
            return []
        return self.task.predict(self.engine, inputs, self.tokenizer, self.cfg.data, self.folder.labels, self.options)


# --------------------------------------------------------------------------------------------- reading


@dataclass
class Inputs:
    """What was read: the inputs, their gold answers (None: the file has no labels) and the report lines."""

    inputs: list
    gold: list | None
    report: list[str]


def read_inputs(
    source: str, predictor: Predictor, *, format: str | None, evaluate: bool, limit: int | None = None
) -> Inputs:
    """The inputs of ``source`` (a path, or ``-`` for stdin) in ``format`` (default: the model's training
    format; stdin: text lines). A labelled file (always with ``evaluate``) is read as training reads it."""
    from dataclasses import replace

    from llmflow_hpo.data.splits import read_file_examples

    cfg = predictor.cfg
    fmt = format or ("text" if source == "-" else cfg.data.format)
    data = replace(cfg.data, format=fmt)
    if source != "-" and fmt != "text" and (evaluate or _has_labels(Path(source), data, cfg.task)):
        examples, report = read_file_examples(source, task=cfg.task, data=data, limit=limit)
        task = predictor.task
        return Inputs([task.example_input(e, data) for e in examples], [task.gold(e, data) for e in examples], report)
    if evaluate:
        raise LlmflowError(f"{source}: --evaluate needs a file with gold labels in format {fmt}, not plain text")
    inputs = []
    for number, value in _unlabelled(source, data, limit):
        try:
            inputs.append(predictor.parse(value))
        except ValueError as e:
            raise DataError(source, f"line {number}: {e}") from None
    return Inputs(inputs, None, [f"{source}: read {len(inputs)} inputs (no labels)"])


def _has_labels(path: Path, data: Any, task: str) -> bool:
    """Whether the first examples of a file read with the training reader (gold labels and all)."""
    from llmflow_hpo.data.splits import read_file_examples

    try:
        read_file_examples(path, task=task, data=data, limit=3)
    except DataError:
        return False
    return True


_COLUMNS = re.compile(r"[ \t]+")


def _unlabelled(source: str, data: Any, limit: int | None) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each input of an unlabelled file: a text line, a CoNLL sentence's words,
    a CSV/TSV row's text column, or a JSON Lines record's words, chat, prompt or text field."""
    count = 0
    for number, value in _values(source, data):
        if limit is not None and count >= limit:
            return
        count += 1
        yield number, value


def _values(source: str, data: Any) -> Iterator[tuple[int, Any]]:
    from llmflow_hpo.data.tables import TABLE_FORMATS, table_rows

    if source != "-" and data.format in TABLE_FORMATS:
        for number, record in table_rows(Path(source), data):
            yield number, _record_value(source, f"row {number}", record, data)
        return
    handle: TextIO = sys.stdin if source == "-" else _open(source, data.encoding)
    try:
        if data.format in ("csv", "tsv"):
            yield from _delimited_values(source, handle, data)
            return
        words: list[str] = []
        for number, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n").removeprefix("\ufeff")
            if data.format == "conll":
                columns = _COLUMNS.split(text.strip(" \t"))
                if columns == [""]:
                    if words:
                        yield number, words
                    words = []
                elif columns[0] != "-DOCSTART-":
                    words.append(columns[min(data.token_column, len(columns) - 1)])
            elif text.strip():
                yield number, _json_value(source, number, text, data) if data.format == "jsonl" else text
        if words:
            yield number + 1, words
    except UnicodeDecodeError as e:
        from llmflow_hpo.data.read import decode_message

        where = decode_message(source, data.encoding, e) if source != "-" else f"cannot decode as {e.encoding}"
        raise DataError(source, f"{where} (with --set)") from None
    finally:
        if handle is not sys.stdin:
            handle.close()


def _open(source: str, encoding: str) -> TextIO:
    path = Path(source)
    if not path.is_file():
        raise DataError(source, "no such file" if not path.exists() else "not a file")
    return path.open(encoding=encoding, newline="")


def _delimited_values(source: str, handle: TextIO, data: Any) -> Iterator[tuple[int, Any]]:
    tab = data.format == "tsv"  # as training reads TSV: a quote is text
    delimiter = "\t" if tab else (data.delimiter or ",")
    reader = csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if tab else csv.QUOTE_MINIMAL)
    column = data.text_column
    if data.header:
        names = [n.strip().removeprefix("\ufeff") for n in next(reader, [])]
        if isinstance(column, str):
            if column not in names:
                raise DataError(source, f"no column {column!r} (columns found: {', '.join(names)})")
            column = names.index(column)
    for row in reader:
        if row:
            if column >= len(row):
                raise DataError(source, f"line {reader.line_num}: {len(row)} column(s), no text column {column}")
            yield reader.line_num, row[column]


def _json_value(source: str, number: int, line: str, data: Any) -> Any:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(source, f"line {number}: not valid JSON ({e.msg})") from None
    return record if isinstance(record, str) else _record_value(source, f"line {number}", record, data)


def _record_value(source: str, where: str, record: Any, data: Any) -> Any:
    """The input of an unlabelled record (a JSON object, a table's row): its words, chat, prompt or text."""
    if isinstance(record, dict):
        for field in (data.tokens_field, data.messages_field, data.prompt_field, data.text_column):
            if field in record:
                return record[field]
    fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
    raise DataError(source, f"{where}: no {data.text_column!r} (or words, messages, prompt) field in {fields}")


# --------------------------------------------------------------------------------------------- writing


def write_records(records: list[dict[str, Any]], out: TextIO, format: Literal["jsonl", "csv"]) -> None:
    """JSON Lines (one record a line), or CSV: scalars as they are, lists and objects as JSON."""
    if format == "jsonl":
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    if not records:
        return
    writer = csv.DictWriter(out, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: v if isinstance(v, (str, int, float)) else json.dumps(v) for k, v in record.items()})


@dataclass
class PredictResult:
    count: int
    seconds: float
    examples_per_second: float
    runtime: str
    metrics: dict[str, float] | None
    output: str | None


def run_predict(
    predictor: Predictor,
    source: str,
    *,
    output: Path | None,
    format: str | None = None,
    output_format: Literal["jsonl", "csv"] | None = None,
    evaluate: bool = False,
    limit: int | None = None,
    log: Any = None,
) -> PredictResult:
    """Read ``source``, predict, write the records to ``output`` (once all are made: a failed run leaves an
    earlier file as it was) or stdout, and score them against the gold labels when there are any."""
    read = read_inputs(source, predictor, format=format, evaluate=evaluate, limit=limit)
    for line in read.report:
        (log or print)(line)
    started = time.perf_counter()
    records = predictor.predict(read.inputs)
    seconds = time.perf_counter() - started
    fmt = output_format or ("csv" if output is not None and output.suffix == ".csv" else "jsonl")
    if output is None:
        write_records(records, sys.stdout, fmt)
    else:
        buffer = io.StringIO()
        write_records(records, buffer, fmt)
        output.write_text(buffer.getvalue(), encoding="utf-8")
    metrics = None
    if read.gold is not None:
        metrics = predictor.task.prediction_metrics(read.gold, records, predictor.cfg)
    return PredictResult(
        count=len(records),
        seconds=seconds,
        examples_per_second=len(records) / seconds if seconds > 0 else float("nan"),
        runtime=predictor.runtime_name,
        metrics=metrics,
        output=str(output) if output else None,
    )
