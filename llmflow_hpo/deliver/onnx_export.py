"""``llmflow-hpo export MODEL_DIR --format onnx``: the model as an ONNX graph, checked, and an INT8 variant.

The exporter is torch's own (``torch.onnx.export(dynamo=True)``, which writes through onnxscript): it follows
the installed torch and transformers. Hugging Face's optimum exporter pins transformers 4.x, which this stack
(transformers 5) is not. The graph takes ``input_ids`` and ``attention_mask`` with dynamic batch and sequence
axes and gives ``logits``. The INT8 variant is onnxruntime's dynamic quantization
(``quantize_dynamic``, int8 weights, activations quantized at run time), which needs no calibration data.

The check runs the model folder's dev file (or ``--check-data``) through PyTorch, the FP32 graph and the INT8
graph: the largest absolute logit difference against PyTorch, the examples whose predicted labels differ, the
training metrics of each, and examples per second at batch 1 and batch 32. It is written to
``onnx/report.json`` beside the graphs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from llmflow_hpo.deliver.model_folder import ONNX_FILES, ModelFolder
from llmflow_hpo.errors import LlmflowError

__all__ = ["export_onnx"]


def export_onnx(
    folder: ModelFolder, *, check_file: str | None = None, limit: int | None = None, log: Any = print
) -> dict[str, Any]:
    """Write ``onnx/model.onnx`` and ``onnx/model.int8.onnx`` into the model folder, check them, and return
    (and write) the report."""
    task = folder.task
    if not task.onnx_runtime:
        raise LlmflowError(
            f"export --format onnx: task {task.name} generates its answers token by token; serve it with "
            "--runtime torch (an ONNX export covers the classification tasks)"
        )
    check = check_file or folder.cfg.data.dev or folder.cfg.data.test
    if check is None or not Path(check).is_file():
        raise LlmflowError(f"export: no file to check the export on ({check}); give a labelled one with --check-data")
    out = folder.path / "onnx"
    out.mkdir(exist_ok=True)
    fp32, int8 = out / ONNX_FILES["fp32"], out / ONNX_FILES["int8"]
    started = time.perf_counter()
    _export(folder, fp32)
    log(f"exported {fp32} in {time.perf_counter() - started:.1f} s (torch.onnx, dynamo)")
    _quantize(fp32, int8)
    log(f"quantized {int8} (onnxruntime dynamic INT8)")
    report = _check(folder, check, limit or folder.cfg.data.limit_dev)
    report["files"] = {name: _size(out / file) for name, file in ONNX_FILES.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _size(path: Path) -> int:
    """A graph's bytes, its external weights file (``.data``) included."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _export(folder: ModelFolder, path: Path) -> None:
    import torch

    model = folder.load_model(torch.device("cpu")).float()

    class Logits(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    sample = folder.load_tokenizer()(["an export sample", "a second one"], padding=True, return_tensors="pt")
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = {0: batch, 1: sequence}
    # torch.onnx prints its progress on stdout, which carries results; its shape notes are warnings only.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(model).eval(),
            (sample["input_ids"], sample["attention_mask"]),
            str(path),
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": axes, "attention_mask": axes},
            opset_version=18,
        )


def _quantize(fp32: Path, int8: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process applies to static (calibrated) quantization
    try:
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def _strip_scores(record: Any) -> Any:
    """A prediction record without its probabilities: what is compared between runtimes."""
    if isinstance(record, dict):
        return {k: _strip_scores(v) for k, v in record.items() if k not in ("score", "probabilities")}
    if isinstance(record, list):
        return [_strip_scores(v) for v in record]
    return record


def _check(folder: ModelFolder, check: str, limit: int | None) -> dict[str, Any]:
    import numpy as np

    from llmflow_hpo.deliver.predict import Predictor, read_inputs

    task = folder.task
    runs = {
        "torch": Predictor(folder, device="cpu"),
        "onnx-fp32": Predictor(folder, runtime="onnx"),
        "onnx-int8": Predictor(folder, runtime="onnx", quantized=True),
    }
    reference = runs["torch"]
    read = read_inputs(check, reference, format=None, evaluate=True, limit=limit)
    encoded = task.encode_inputs(read.inputs, reference.tokenizer, reference.options.max_length)
    ids = [e["input_ids"] for e in encoded]
    logits = {name: p.engine.logits(ids, 32) for name, p in runs.items()}
    records = {
        name: [task.decode(row, e, folder.labels) for row, e in zip(rows, encoded, strict=True)]
        for name, rows in logits.items()
    }
    report: dict[str, Any] = {"check_data": str(check), "examples": len(ids), "runtimes": {}}
    for name, p in runs.items():
        diff = max(float(np.abs(a - b).max()) for a, b in zip(logits[name], logits["torch"], strict=True))
        differ = sum(_strip_scores(a) != _strip_scores(b) for a, b in zip(records[name], records["torch"], strict=True))
        report["runtimes"][name] = {
            "max_abs_logit_diff": diff,
            "examples_with_other_labels": differ,
            "metrics": task.prediction_metrics(read.gold, records[name], folder.cfg),
            "examples_per_second": {str(b): _speed(p, read.inputs, b) for b in (1, 32)},
        }
    return report


def _speed(predictor: Any, inputs: list, batch_size: int) -> float:
    """Examples per second of ``predict`` over the first 64 inputs (batch 1) or 256 (batch 32), after a warm-up."""
    from dataclasses import replace

    sample = inputs[: 64 if batch_size == 1 else 256]
    predictor.options = replace(predictor.options, batch_size=batch_size)
    predictor.predict(sample[:batch_size])
    started = time.perf_counter()
    predictor.predict(sample)
    return len(sample) / (time.perf_counter() - started)
