"""What runs a model for ``predict``, ``serve`` and ``export``'s check: PyTorch or onnxruntime, one interface.

``engine.logits(ids, batch_size)`` gives each input's logits (a numpy array: per position for NER, one row for
a text) in the inputs' order. Inputs are taken longest first in batches of similar length, right-padded with
an attention mask, so padding costs little; PyTorch runs under inference mode with the training run's device
and precision rules (``recipe.runtime``: bf16 autocast on a GPU that has it, fp32 on CPU).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmflow_hpo.errors import LlmflowError

__all__ = ["OnnxEngine", "TorchEngine", "length_batches"]


def length_batches(
    ids: list[list[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """``(indices, input_ids, attention_mask)`` batches, longest inputs first, right-padded with ``pad_id``."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, i in enumerate(batch):
            input_ids[row, : len(ids[i])] = ids[i]
            mask[row, : len(ids[i])] = 1
        yield batch, input_ids, mask


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def _progress(total: int, show: bool) -> Any:
    """A progress bar on stderr when it is a terminal and ``show``; otherwise nothing is made (serve calls
    this for every batch)."""
    if not (show and sys.stderr.isatty()):
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ex", file=sys.stderr)


def _unpad(logits: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    """Each row's logits; per-position logits cut to the row's length."""
    if logits.ndim == 2:
        return list(logits)
    return [logits[row, :length] for row, length in enumerate(lengths)]


class TorchEngine:
    """The PyTorch model (``deliver.model_folder.ModelFolder.load_model``) on its device."""

    name = "torch"

    def __init__(self, model: Any, runtime: Any, pad_id: int, progress: bool = False) -> None:
        self.model = model
        self.runtime = runtime
        self.device = runtime.device
        self.pad_id = pad_id
        self.progress = progress

    def logits(self, ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
        import torch

        out: list[np.ndarray | None] = [None] * len(ids)
        with torch.inference_mode(), _progress(len(ids), self.progress) as bar:
            for batch, input_ids, mask in length_batches(ids, batch_size, self.pad_id):
                with self.runtime.autocast():
                    logits = self.model(
                        input_ids=torch.from_numpy(input_ids).to(self.device),
                        attention_mask=torch.from_numpy(mask).to(self.device),
                    ).logits
                rows = _unpad(logits.float().cpu().numpy(), [len(ids[i]) for i in batch])
                for i, row in zip(batch, rows, strict=True):
                    out[i] = row
                bar.update(len(batch))
        return out  # type: ignore[return-value]


class OnnxEngine:
    """An exported graph (``export --format onnx``) in onnxruntime: CUDA when onnxruntime has it, else CPU."""

    name = "onnx"

    def __init__(self, path: Path, pad_id: int, threads: int | None = None, progress: bool = False) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise LlmflowError("--runtime onnx needs onnxruntime: pip install 'llmflow-hpo[onnx]'") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.pad_id = pad_id
        self.progress = progress
        self.device = "cpu"

    def logits(self, ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(ids)
        with _progress(len(ids), self.progress) as bar:
            for batch, input_ids, mask in length_batches(ids, batch_size, self.pad_id):
                feed = {"input_ids": input_ids, "attention_mask": mask}
                (logits,) = self.session.run(["logits"], {k: v for k, v in feed.items() if k in self.inputs})
                for i, row in zip(batch, _unpad(logits, [len(ids[i]) for i in batch]), strict=True):
                    out[i] = row
                bar.update(len(batch))
        return out  # type: ignore[return-value]
