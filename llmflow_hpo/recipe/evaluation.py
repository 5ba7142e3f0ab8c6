"""The evaluation of a model on a dev or test split (its metrics and loss), and the digest of its weights.

The task decodes each batch's predictions and scores the split (``tasks.BaseTask.batch_predictions``
and ``score``); the loss is the plain cross-entropy over the labelled positions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from llmflow_hpo.data.features import Features
from llmflow_hpo.recipe.runtime import Runtime
from llmflow_hpo.tasks import IGNORE_INDEX, get_task

__all__ = ["evaluate", "weights_digest"]


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    features: Features,
    split: str,
    runtime: Runtime,
) -> dict[str, float]:
    """Dev or test metrics: the task's scores of the split (``score``) and the cross-entropy ``loss``.

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
        flat = labels.reshape(-1)
        count = int((flat != IGNORE_INDEX).sum())
        total_loss += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE_INDEX, reduction="sum"
            )
        )
        total_count += count
        predictions.extend(task.batch_predictions(logits, labels))
    model.train()
    order = loader.sampler if isinstance(loader.sampler, list) else None
    if order is not None:  # back to the split's order
        unsorted: list[Any] = [None] * len(predictions)
        for position, index in enumerate(order):
            unsorted[index] = predictions[position]
        predictions = unsorted
    metrics = task.score(features, split, predictions)
    metrics["loss"] = total_loss / max(total_count, 1)
    return metrics


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's state dict (names and exact bytes): two runs that reach the same weights agree."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()
