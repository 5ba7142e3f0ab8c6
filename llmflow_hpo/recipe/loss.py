"""The training loss: cross-entropy (label smoothing, class weights) or focal loss, and the class weights.

The dev and test loss of ``evaluate`` is plain cross-entropy; this is what the optimizer minimises.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmflow_hpo.config.study import TrainConfig
from llmflow_hpo.data.features import Features
from llmflow_hpo.tasks import IGNORE_INDEX

__all__ = ["balanced_class_weights", "loss_fn"]


def balanced_class_weights(features: Features, split_labels: list[Any], device: torch.device) -> torch.Tensor:
    """balanced: n / (n_classes * n_c), as scikit-learn's compute_class_weight; unseen classes weigh 1."""
    counts = np.zeros(len(features.labels), dtype=np.float64)
    for row in split_labels:
        for label in row if isinstance(row, list) else [row]:
            if label != IGNORE_INDEX:
                counts[label] += 1
    total = counts.sum()
    weights = np.where(counts > 0, total / (len(counts) * np.maximum(counts, 1)), 1.0)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def loss_fn(
    logits: torch.Tensor, labels: torch.Tensor, hp: TrainConfig, class_weights: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy (with label smoothing and class weights) or focal loss; IGNORE_INDEX positions skipped.

    A class weight weighs the positions whose *target* is that class, and the loss is the weighted mean
    over positions (divided by the sum of the targets' weights), as weighted cross-entropy is. Label
    smoothing spreads its share uniformly over the classes, whatever their weights: torch's
    ``cross_entropy(weight=w, label_smoothing=e)`` would weigh the smoothing term of every position by
    every class's weight, which moves the optimum of an ``O`` word towards the rare classes (with balanced
    NER weights and e=0.2, far enough to flip its argmax). Focal loss (Lin et al. 2017) scales each
    position's smoothed cross-entropy by (1 - p_t)^gamma and is normalised the same way.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    smoothing = hp.label_smoothing
    if hp.loss == "cross_entropy" and (class_weights is None or smoothing == 0):
        return F.cross_entropy(
            logits, labels, weight=class_weights, ignore_index=IGNORE_INDEX, label_smoothing=smoothing
        )
    keep = labels != IGNORE_INDEX
    if not bool(keep.any()):  # nothing labelled in this batch: no loss, not a divergence
        return logits.sum() * 0.0
    logits, labels = logits[keep], labels[keep]
    per_position = F.cross_entropy(logits, labels, reduction="none", label_smoothing=smoothing)
    if hp.loss == "focal":
        p_t = torch.softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
        per_position = (1.0 - p_t) ** hp.focal_gamma * per_position
    if class_weights is None:
        return per_position.mean()
    weights = class_weights[labels]
    return (weights * per_position).sum() / weights.sum()
