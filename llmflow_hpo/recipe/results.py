"""What a training run hands back: its dev evaluations and its result, and which of two scores is better.

Torch-free on purpose: the search (objective, reporting, the Ray driver) reads these types without
importing torch; only the recipe that fills them runs torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Evaluation", "OnCosts", "OnEval", "OnResume", "OnStep", "TrainResult", "better"]

# After each dev evaluation of a search trial; it may raise optuna.TrialPruned.
OnEval = Callable[["Evaluation"], "bool | None"]  # True: end the run after this evaluation (a budget spent)
# Once, when a trial resumes from a checkpoint: the evaluations the saved state had made.
OnResume = Callable[[list["Evaluation"]], None]
# After each optimizer step: (examples seen, examples the run will see at most, mean training loss since the
# last evaluation). For progress displays; it must be cheap.
OnStep = Callable[[int, int, float], None]
# Once, after set-up and before the first batch: what the run's model costs, by trial attribute
# (n_params; latency_ms in a study whose objective.cost is latency_ms). Pruned trials have them too.
OnCosts = Callable[[dict[str, float]], None]


@dataclass
class Evaluation:
    """One dev evaluation. ``step`` is the nominal number of training examples seen (the pruner's unit)."""

    step: int
    examples_seen: int
    optimizer_step: int
    epoch: float
    metrics: dict[str, float]
    train_loss: float
    last: bool = False  # the run ends after this evaluation (its last point, or early stopping)
    weights_sha256: str | None = None  # the model's weights_digest, taken when this evaluation is the best so far
    samples: list[dict[str, str]] = field(default_factory=list)  # the task's outputs on a few dev examples


@dataclass
class TrainResult:
    best: Evaluation | None
    history: list[Evaluation]
    stopped_early: bool
    train_time_s: float
    examples_per_second: float
    n_params: int
    n_trainable: int
    peak_memory_mb: float
    peak_memory_kind: str
    device: str
    model: Any = None  # the trained model, on the CPU: retrain, or train_and_evaluate(keep_model=True)
    test_metrics: dict[str, float] = field(default_factory=dict)
    test_samples: list[dict[str, str]] = field(default_factory=list)  # the task's outputs on a few test examples
    final: Evaluation | None = None  # the evaluation at retrain's stop_at_examples
    checkpoints_written: int = 0
    checkpoint_seconds: float = 0.0
    torch_threads: int = 0
    setup_seconds: float = 0.0  # model and tokenizer load, loaders, optimizer: before the first batch
    train_seconds: float = 0.0  # the training steps
    eval_seconds: float = 0.0  # the dev evaluations
    runtime: dict[str, Any] = field(default_factory=dict)  # Runtime.attrs()


def better(value: float, best: float | None, direction: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (a first value always does).

    With ``min_delta`` 0 this decides which evaluation is the trial's best (strictly better: the first of
    equal scores stays); with ``train.early_stopping_min_delta`` it decides only early stopping's patience.
    """
    if best is None:
        return True
    return value - best > min_delta if direction == "maximize" else best - value > min_delta
