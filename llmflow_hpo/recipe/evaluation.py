"""The evaluation of a model on a dev or test split (its metrics and loss), its inference latency, and the
digest of its weights.

The task decodes each batch's predictions and scores the split (``tasks.BaseTask.batch_predictions``
and ``score``); the loss is the plain cross-entropy over the labelled positions.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from llmflow_hpo.data.features import Features
from llmflow_hpo.recipe.runtime import Runtime
from llmflow_hpo.tasks import IGNORE_INDEX, get_task

__all__ = ["LATENCY_EXAMPLES", "evaluate", "latency_ms", "weights_digest"]

# The latency of a cost study (objective.cost: latency_ms): the first dev examples, one at a time.
LATENCY_EXAMPLES = 100
_LATENCY_WARMUP = 5  # forward passes before timing (kernels chosen, caches warm)
_LATENCY_REPEATS = 3  # timed passes over the examples; the fastest counts


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    features: Features,
    split: str,
    runtime: Runtime,
    *,
    tokenizer: Any = None,
    cfg: Any = None,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Dev or test metrics: the task's scores of the split (``score``), the cross-entropy ``loss`` and what the
    task evaluates beyond the logits (``evaluate_more``: a causal LM's generated answers, with the study config
    ``cfg`` and the ``tokenizer``); with the task's samples of its outputs (none for most tasks).

    The loader may take the examples in any order given as its sampler (a list of indices, e.g. by
    length); predictions are put back in the split's order before scoring.
    """
    task = get_task(features.task)
    model.eval()
    total_loss, total_count = 0.0, 0
    predictions: list[Any] = []
    device = runtime.device
    for batch in loader:
        batch = {k: v.to(device, non_blocking=runtime.pin_memory) for k, v in batch.items()}
        labels = batch.pop("labels")
        with runtime.autocast():
            logits = model(**batch).logits
        paired, targets = task.loss_inputs(logits, labels)
        flat = targets.reshape(-1)
        count = int((flat != IGNORE_INDEX).sum())
        total_loss += float(
            F.cross_entropy(
                paired.reshape(-1, paired.shape[-1]).float(), flat, ignore_index=IGNORE_INDEX, reduction="sum"
            )
        )
        total_count += count
        predictions.extend(task.batch_predictions(logits, labels))
    order = loader.sampler if isinstance(loader.sampler, list) else None
    if order is not None and predictions:  # back to the split's order (a task may predict nothing per example)
        unsorted: list[Any] = [None] * len(predictions)
        for position, index in enumerate(order):
            unsorted[index] = predictions[position]
        predictions = unsorted
    metrics = task.score(features, split, predictions)
    metrics["loss"] = total_loss / max(total_count, 1)
    more, samples = task.evaluate_more(model, tokenizer, features, split, runtime, cfg, metrics["loss"])
    model.train()
    return {**metrics, **more}, samples


@torch.inference_mode()
def latency_ms(model: torch.nn.Module, loader: DataLoader, runtime: Runtime) -> float:
    """Inference latency per example in milliseconds: the model's forward pass over the loader's batches (one
    example each), in eval mode under the run's autocast, the inputs already on the device (the copy and the
    decoding are not timed). After a few warm-up passes, every batch is run ``_LATENCY_REPEATS`` times over, each
    pass timed with ``time.perf_counter`` (on a GPU between two ``torch.cuda.synchronize``); the fastest pass
    counts, as ``timeit`` advises (the slower ones measured the machine's other work), divided by its batches.

    It depends on the model's shape and the inputs, not on its weights' values: a run measures it once, before
    it trains."""
    device = runtime.device
    batches = [{k: v.to(device) for k, v in batch.items() if k != "labels"} for batch in loader]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.eval()
    for batch in batches[:_LATENCY_WARMUP]:
        with runtime.autocast():
            model(**batch)
    fastest = math.inf
    for _ in range(_LATENCY_REPEATS):
        sync()
        tick = time.perf_counter()
        for batch in batches:
            with runtime.autocast():
                model(**batch)
        sync()
        fastest = min(fastest, time.perf_counter() - tick)
    model.train()
    return fastest / max(len(batches), 1) * 1000


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's state dict (names and exact bytes): two runs that reach the same weights agree."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()
