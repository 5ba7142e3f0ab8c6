"""The optimizer and the learning-rate schedule of a run, and how a loaded pair takes new hyperparameters.

``build_optimizer`` puts weight decay on weights only; ``build_scheduler`` gives warmup as a ratio of the
run's optimizer steps; ``adopt_hyperparameters`` lets a state cloned from another trial (PBT) go on with
this trial's learning rate, weight decay and momentum.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llmflow_hpo.config.study import TrainConfig
from llmflow_hpo.recipe.runtime import Runtime

__all__ = ["adopt_hyperparameters", "build_optimizer", "build_scheduler", "warmup_steps"]


def build_optimizer(model: torch.nn.Module, hp: TrainConfig, runtime: Runtime) -> torch.optim.Optimizer:
    """Weight decay on weights only: not on biases, not on normalisation layers (LayerNorm, and the RMSNorm of
    Llama-style models, by class name); the first group decays. A weight shared by two modules (a causal LM's
    embeddings tied to its output layer) is one parameter, stepped once; frozen ones (an adapter's base) are left out.
    """
    decay, no_decay = [], []
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d)
    seen: set[int] = set()
    for module in model.modules():
        norm = isinstance(module, norm_types) or "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if norm or name == "bias" else decay).append(param)
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=hp.learning_rate, fused=runtime.fused_optimizer or None)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=hp.learning_rate, momentum=hp.momentum)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=hp.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Warmup as a ratio of the run's optimizer steps (TrainingArguments no longer takes a ratio)."""
    return math.ceil(warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, hp: TrainConfig, total_steps: int) -> Any:
    """The learning-rate schedule over the whole run, warmup given as a ratio of its optimizer steps."""
    from transformers import get_scheduler

    return get_scheduler(
        hp.scheduler,
        optimizer,
        num_warmup_steps=warmup_steps(hp.warmup_ratio, total_steps),
        num_training_steps=total_steps,
    )


def adopt_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, hp: TrainConfig) -> None:
    """A loaded optimizer and schedule take this run's learning rate, weight decay and momentum.

    The state (moments, step count) is kept; the schedule's factor at the current step is applied to the
    new peak learning rate. ``build_optimizer`` puts the decayed weights in the first group.
    """
    scheduler.base_lrs = [hp.learning_rate for _ in optimizer.param_groups]
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = hp.learning_rate
        if i == 0 and "weight_decay" in group:
            group["weight_decay"] = hp.weight_decay
        if "momentum" in group:
            group["momentum"] = hp.momentum
    # Take the current step again from the new base: the schedule sets every group's rate to
    # base * factor(step), and get_last_lr() reports it (torch has no public setter for either).
    scheduler.last_epoch -= 1
    scheduler.step()
