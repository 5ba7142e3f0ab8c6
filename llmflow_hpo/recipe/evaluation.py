"""The evaluation of a model on a dev or test split (its metrics and loss), and the digest of its weights.

Entity-level scores (seqeval) on word-level tags for token classification, scikit-learn's for text
classification; the loss is the plain cross-entropy over the labelled positions.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from llmflow_hpo.data.features import IGNORE_INDEX, Features
from llmflow_hpo.recipe.runtime import Runtime
from llmflow_hpo.tasks.metrics import text_classification_metrics, token_classification_metrics

__all__ = ["evaluate", "weights_digest", "word_predictions"]


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    features: Features,
    split: str,
    runtime: Runtime,
) -> dict[str, float]:
    """Dev or test metrics: entity-level (seqeval) on word-level tags for NER, scikit-learn for classification.

    The loader may take the examples in any order given as its sampler (a list of indices, e.g. by
    length); predictions are put back in the split's order before scoring.
    """
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
        predicted = logits.argmax(-1)
        if features.task == "token-classification":
            for row_pred, row_labels in zip(predicted.cpu().tolist(), labels.cpu().tolist(), strict=True):
                predictions.append([p for p, g in zip(row_pred, row_labels, strict=True) if g != IGNORE_INDEX])
        else:
            predictions.extend(predicted.cpu().tolist())
    model.train()
    order = loader.sampler if isinstance(loader.sampler, list) else None
    if order is not None:  # back to the split's order
        unsorted: list[Any] = [None] * len(predictions)
        for position, index in enumerate(order):
            unsorted[index] = predictions[position]
        predictions = unsorted
    names = features.labels
    if features.task == "token-classification":
        gold = features.gold_tags(split)
        pred = word_predictions(predictions, features.splits[split]["label_words"], gold, names)
        metrics = token_classification_metrics(gold, pred)
    else:
        metrics = text_classification_metrics(features.gold_labels(split), [names[i] for i in predictions])
    metrics["loss"] = total_loss / max(total_count, 1)
    return metrics


def word_predictions(
    positions: list[list[int]], label_words: list[list[int]], gold: list[list[str]], names: list[str]
) -> list[list[str]]:
    """Word-level tags from the predictions at the labelled (first-subword) positions of each example.

    ``label_words`` gives the word of each labelled position. A word with no position (cut off by
    max_length, or given no subword by the tokenizer) is predicted O: never dropped, never shifted.
    """
    pred: list[list[str]] = []
    for row, words, g in zip(positions, label_words, gold, strict=True):
        if len(row) != len(words):
            raise ValueError(f"{len(row)} labelled positions but {len(words)} words they belong to")
        tags = ["O"] * len(g)
        for label, word in zip(row, words, strict=True):
            tags[word] = names[label]
        pred.append(tags)
    return pred


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state (names and exact bytes): two runs that reach the same weights agree."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()
