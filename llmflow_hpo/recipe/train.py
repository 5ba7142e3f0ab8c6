"""One training recipe: set up, train, evaluate on dev several times, keep the best, free everything.

Reads top to bottom. The same function runs a search trial (reporting each evaluation, which may prune
it) and ``retrain-best`` (stopping at the best trial's step and handing the model back).

Reproducibility: the training order comes from a generator seeded with the trial's seed, and the
evaluation loaders own their generators too, so evaluating never draws from the global torch RNG.
A retrain with the same seed that skips the evaluations reaches the same weights at the same step.

Resuming: with a ``checkpoint``, the loop saves its whole state after dev evaluations (model, optimizer,
scheduler, the RNG states, the generator state at the start of the epoch and how far into the epoch it
was). A run given a saved state continues from it and takes the same batches and dropout masks an
uninterrupted run would have taken.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from llmflow_hpo.config.study import StudyConfig, TrainConfig, clip_norm
from llmflow_hpo.data.features import IGNORE_INDEX, WORD_LEVEL_COLUMNS, Features
from llmflow_hpo.errors import ConfigError, TrialFailure
from llmflow_hpo.recipe.models import build_model, load_tokenizer
from llmflow_hpo.tasks.metrics import text_classification_metrics, token_classification_metrics

__all__ = [
    "Evaluation",
    "Runtime",
    "TrainResult",
    "better",
    "build_scheduler",
    "evaluate",
    "loss_fn",
    "resolve_device",
    "resolve_runtime",
    "runtime_attrs",
    "train_and_evaluate",
    "warmup_steps",
    "weights_digest",
    "word_predictions",
]

OnEval = Callable[["Evaluation"], None]
OnResume = Callable[[list["Evaluation"]], None]
# After each optimizer step: (examples seen, examples the run will see at most, mean training loss since the
# last evaluation). For progress displays; it must be cheap.
OnStep = Callable[[int, int, float], None]


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


@dataclass
class TrainResult:
    best: Evaluation | None
    history: list[Evaluation]
    stopped_early: bool
    train_time_s: float
    examples_per_second: float
    n_params: int
    peak_memory_mb: float
    peak_memory_kind: str
    device: str
    model: Any = None  # only when keep_model=True (retrain-best)
    test_metrics: dict[str, float] = field(default_factory=dict)
    final: Evaluation | None = None  # the evaluation at stop_at_examples (retrain-best)
    checkpoints_written: int = 0
    checkpoint_seconds: float = 0.0
    torch_threads: int = 0
    setup_seconds: float = 0.0  # model and tokenizer load, loaders, optimizer: before the first batch
    train_seconds: float = 0.0  # the training steps
    eval_seconds: float = 0.0  # the dev evaluations
    runtime: dict[str, Any] = field(default_factory=dict)  # Runtime.attrs()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name} asked for, but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Runtime:
    """How a run uses its device, chosen from the device and ``train.precision``; stored with every trial."""

    device: torch.device
    precision: str  # fp32, bf16 (autocast) or fp16 (autocast with loss scaling)
    tf32: bool  # fp32 matmuls on TF32 tensor cores (Ampere and later)
    fused_optimizer: bool  # AdamW's fused kernel (CPU or CUDA)
    pin_memory: bool  # page-locked batches, copied with non_blocking=True

    def autocast(self) -> AbstractContextManager[Any]:
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def attrs(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "tf32": self.tf32,
            "fused_optimizer": self.fused_optimizer,
            "pin_memory": self.pin_memory,
        }


def runtime_attrs(cfg: StudyConfig, params: dict[str, Any], runtime: Runtime | None = None) -> dict[str, Any]:
    """What a trial with ``params`` runs with (device, precision, TF32, fused optimizer, pinned memory,
    length grouping): the trial's user attributes, written when it starts."""
    hp = dataclasses.replace(cfg.train, **params)
    return {**(runtime or resolve_runtime(hp)).attrs(), "group_by_length": hp.group_by_length}


def resolve_runtime(hp: TrainConfig, device: torch.device | None = None) -> Runtime:
    """On a GPU: bf16 where it has it (else fp16 with loss scaling), TF32, pinned memory.

    On CPU everything stays fp32 unless ``train.precision`` asks for bf16. AdamW runs torch's fused
    kernel on both (``train.fused_optimizer``), which torch has for CPU and CUDA tensors.
    """
    device = device or resolve_device(hp.device)
    cuda = device.type == "cuda"
    precision = hp.precision
    if precision == "auto":
        precision = "fp32"
        if cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision == "fp16" and not cuda:
        raise ConfigError(f"train.precision: fp16 needs a GPU and this run is on {device}; use fp32 or bf16")
    return Runtime(
        device=device,
        precision=precision,
        tf32=cuda and torch.cuda.get_device_capability(device)[0] >= 8,
        fused_optimizer=hp.fused_optimizer and hp.optimizer == "adamw" and device.type in ("cpu", "cuda"),
        pin_memory=cuda,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _collator(task: str, tokenizer: Any) -> Any:
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    if task == "token-classification":
        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)
    return DataCollatorWithPadding(tokenizer)


class _EpochSampler(torch.utils.data.Sampler[int]):
    """The training order of an epoch, drawn from the loader's generator, able to start mid-epoch.

    Without ``lengths``: the order of ``DataLoader(shuffle=True, generator=g)`` (one permutation per
    epoch, and a second, unused one at the end of the epoch, as RandomSampler draws). With ``lengths``:
    the Hugging Face Trainer's length grouping (``get_length_grouped_indices``: a permutation cut into
    groups of 50 batches, each sorted by length, the longest batch first), so a batch holds examples of
    similar length and dynamic padding pads little. ``skip`` drops the first examples of the next epoch
    drawn: the ones a resumed run had already trained on.
    """

    def __init__(
        self, n: int, generator: torch.Generator, lengths: list[int] | None = None, batch_size: int = 1
    ) -> None:
        self.n = n
        self.generator = generator
        self.lengths = lengths
        self.batch_size = batch_size
        self.skip = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        if self.lengths is not None:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            order = get_length_grouped_indices(self.lengths, self.batch_size, generator=self.generator)
        else:
            order = torch.randperm(self.n, generator=self.generator).tolist()
        skip, self.skip = self.skip, 0
        yield from order[skip:]
        torch.randperm(self.n, generator=self.generator)


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class _ModelInputs(torch.utils.data.Dataset):
    """The columns the model takes (not the word-level gold tags), read row by row from the cached dataset.

    A plain view rather than ``Dataset.remove_columns``: no fingerprinting (hashing) work per trial.
    """

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.columns = [c for c in ds.column_names if c not in WORD_LEVEL_COLUMNS]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.ds[index]
        return {c: row[c] for c in self.columns}


def _optimizer(model: torch.nn.Module, hp: TrainConfig, runtime: Runtime) -> torch.optim.Optimizer:
    """Weight decay on weights only: not on biases, not on normalisation layers."""
    decay, no_decay = [], []
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if isinstance(module, norm_types) or name == "bias" else decay).append(param)
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=hp.learning_rate, fused=runtime.fused_optimizer or None)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=hp.learning_rate, momentum=hp.momentum)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=hp.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)


def _adopt_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, hp: TrainConfig) -> None:
    """A loaded optimizer and schedule take this run's learning rate, weight decay and momentum.

    The state (moments, step count) is kept; the schedule's factor at the current step is applied to the
    new peak learning rate. ``_optimizer`` puts the decayed weights in the first group.
    """
    scheduler.base_lrs = [hp.learning_rate for _ in optimizer.param_groups]
    for i, (group, factor) in enumerate(zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True)):
        group["initial_lr"] = hp.learning_rate
        group["lr"] = hp.learning_rate * factor(scheduler.last_epoch)
        if i == 0 and "weight_decay" in group:
            group["weight_decay"] = hp.weight_decay
        if "momentum" in group:
            group["momentum"] = hp.momentum
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


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


def _class_weights(features: Features, split_labels: list[Any], device: torch.device) -> torch.Tensor:
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


def _lengths(ds: Any) -> list[int]:
    """Each example's length in tokens (what dynamic padding pads to)."""
    return [len(ids) for ids in ds["input_ids"]]


def _by_length(ds: Any) -> list[int]:
    """Evaluation order: longest first (a memory error shows at once), so each batch pads little."""
    lengths = _lengths(ds)
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


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


def better(value: float, best: float | None, direction: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (a first value always does).

    With ``min_delta`` 0 this decides which evaluation is the trial's best (strictly better: the first of
    equal scores stays); with ``train.early_stopping_min_delta`` it decides only early stopping's patience.
    """
    if best is None:
        return True
    return value - best > min_delta if direction == "maximize" else best - value > min_delta


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state (names and exact bytes): two runs that reach the same weights agree."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20, "process_max_rss"


def train_and_evaluate(
    cfg: StudyConfig,
    params: dict[str, Any],
    features: Features,
    *,
    seed: int,
    on_eval: OnEval | None = None,
    stop_at_examples: int | None = None,
    train_split: str = "train",
    keep_model: bool = False,
    evaluate_test: bool = False,
    checkpoint: Any = None,
    on_resume: OnResume | None = None,
    on_step: OnStep | None = None,
) -> TrainResult:
    """Train with ``params`` (searched values over cfg.train's fixed ones) and evaluate on dev.

    Search trials (``stop_at_examples`` None) evaluate ``evals_per_epoch`` times an epoch, call
    ``on_eval`` after each evaluation (it may raise optuna.TrialPruned) and stop early after
    ``early_stopping_patience`` evaluations without improvement. Retraining passes ``stop_at_examples``:
    it trains, without evaluating, until that many examples were seen, then evaluates dev (and test).

    ``checkpoint`` (a ``checkpoints.TrialCheckpoint``): resume from its saved state when it has one, save
    the state after evaluations that do not end the run when it says one is due, and keep the best
    model (written with the next checkpoint, or when the run completes). ``on_resume`` receives the evaluations the saved state had made.
    ``on_step`` is called after every optimizer step (progress displays).
    """
    entered = time.perf_counter()
    hp = dataclasses.replace(cfg.train, **params)
    runtime = resolve_runtime(hp)
    device = runtime.device
    threads_before = torch.get_num_threads()
    matmul_precision_before = torch.get_float32_matmul_precision()
    if runtime.tf32:
        torch.set_float32_matmul_precision("high")
    if hp.num_threads is not None:
        torch.set_num_threads(hp.num_threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    direction, metric = cfg.direction, cfg.metric
    state: dict[str, Any] = {}  # every heavy object of the trial lives here and is dropped in `finally`
    try:
        _seed_everything(seed)
        tokenizer = load_tokenizer(cfg.model)
        model = build_model(
            cfg.model,
            task=cfg.task,
            labels=features.labels,
            hidden_dropout=hp.hidden_dropout,
            attention_dropout=hp.attention_dropout,
        ).to(device)
        state["model"] = model
        model.train()
        collate = _collator(cfg.task, tokenizer)
        train_ds = features.splits[train_split]
        n_train = len(train_ds)
        pin = runtime.pin_memory
        generator = torch.Generator().manual_seed(seed)
        lengths = _lengths(train_ds) if hp.group_by_length else None
        sampler = _EpochSampler(n_train, generator, lengths, hp.batch_size)
        state["train_loader"] = train_loader = DataLoader(
            _ModelInputs(train_ds),
            batch_size=hp.batch_size,
            sampler=sampler,
            collate_fn=collate,
            generator=generator,  # the loader draws its base seed from it each epoch, as with shuffle=True
            pin_memory=pin,
        )

        def eval_loader(split: str) -> DataLoader:
            return DataLoader(
                _ModelInputs(features.splits[split]),
                batch_size=hp.eval_batch_size,
                sampler=_by_length(features.splits[split]),
                collate_fn=collate,
                generator=torch.Generator().manual_seed(0),  # keeps evaluation off the global RNG
                pin_memory=pin,
            )

        state["dev_loader"] = dev_loader = eval_loader("dev")
        state["optimizer"] = optimizer = _optimizer(model, hp, runtime)
        scaler = torch.amp.GradScaler(device.type) if runtime.precision == "fp16" else None
        max_norm = clip_norm(hp.max_grad_norm)
        total_steps = hp.epochs * math.ceil(n_train / hp.batch_size)
        scheduler = build_scheduler(optimizer, hp, total_steps)
        class_weights = None
        if hp.class_weighting == "balanced":
            class_weights = _class_weights(features, train_ds["labels"], device)

        # Evaluation points in examples seen: the same positions whatever the batch size.
        eval_points = hp.evaluation_points(n_train)
        if stop_at_examples is not None:
            eval_points = [stop_at_examples]
        run_examples = eval_points[-1] if eval_points else 0
        next_point = 0
        history: list[Evaluation] = []
        best: Evaluation | None = None
        since_best = 0
        stopped_early = False
        examples_seen = optimizer_step = 0
        running_loss, running_count = 0.0, 0
        train_seconds = eval_seconds = 0.0
        start = time.perf_counter()
        setup_seconds = start - entered
        done = False
        first_epoch = examples_in_epoch = 0
        epoch_start_state: torch.Tensor | None = None
        saved = checkpoint.load() if checkpoint is not None and stop_at_examples is None else None
        if saved is not None:
            progress = saved["progress"]
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            if saved.get("params") != params:  # PBT: another trial's state, continued with mutated parameters
                _adopt_hyperparameters(optimizer, scheduler, hp)
            _set_rng_state(saved["rng"], device)
            epoch_start_state = progress["epoch_start_state"]
            first_epoch, examples_in_epoch = progress["epoch"], progress["examples_in_epoch"]
            sampler.skip = examples_in_epoch
            examples_seen, optimizer_step = progress["examples_seen"], progress["optimizer_step"]
            next_point, since_best = progress["next_point"], progress["since_best"]
            train_seconds = progress["train_seconds"]
            eval_seconds = progress.get("eval_seconds", 0.0)
            start -= progress["elapsed"]
            history = [Evaluation(**e) for e in progress["history"]]
            best = history[progress["best_index"]] if progress["best_index"] is not None else None
            saved = None
            if on_resume is not None:
                on_resume(history)

        def save_checkpoint(epoch: int) -> None:
            checkpoint.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": _rng_state(device),
                    "progress": {
                        "epoch": epoch,
                        "examples_in_epoch": examples_in_epoch,
                        "epoch_start_state": epoch_start_state,
                        "examples_seen": examples_seen,
                        "optimizer_step": optimizer_step,
                        "next_point": next_point,
                        "since_best": since_best,
                        "train_seconds": train_seconds,
                        "eval_seconds": eval_seconds,
                        "elapsed": time.perf_counter() - start,
                        "history": [dataclasses.asdict(e) for e in history],
                        "best_index": next((i for i, e in enumerate(history) if e is best), None),
                    },
                }
            )

        def evaluate_dev(step: int) -> Evaluation:
            nonlocal eval_seconds
            tick = time.perf_counter()
            evaluation = Evaluation(
                step=step,
                examples_seen=examples_seen,
                optimizer_step=optimizer_step,
                epoch=examples_seen / n_train,
                metrics=evaluate(model, dev_loader, features, "dev", runtime),
                train_loss=running_loss / max(running_count, 1),
            )
            eval_seconds += time.perf_counter() - tick
            return evaluation

        for epoch in range(first_epoch, hp.epochs):
            tick = time.perf_counter()
            if epoch == first_epoch and epoch_start_state is not None:  # resuming: replay this epoch's draws
                generator.set_state(epoch_start_state)
            else:
                examples_in_epoch = 0
                epoch_start_state = generator.get_state()
            for batch in train_loader:
                batch = {k: v.to(device, non_blocking=pin) for k, v in batch.items()}
                labels = batch.pop("labels")
                with runtime.autocast():
                    logits = model(**batch).logits
                loss = loss_fn(logits, labels, hp, class_weights)
                if not torch.isfinite(loss):
                    raise TrialFailure(
                        f"diverged: non-finite training loss ({float(loss.detach())}) at optimizer step {optimizer_step + 1} "
                        f"(learning_rate={hp.learning_rate:g})"
                    )
                if scaler is None:
                    loss.backward()
                    if max_norm is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                    optimizer.step()
                else:  # fp16: scaled gradients, unscaled before clipping; a step with inf/nan gradients is skipped
                    scaler.scale(loss).backward()
                    if max_norm is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                    scaler.step(optimizer)
                    scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                optimizer_step += 1
                examples_seen += len(labels)
                examples_in_epoch += len(labels)
                running_loss += float(loss.detach())
                running_count += 1
                if on_step is not None:
                    on_step(examples_seen, run_examples, running_loss / running_count)
                if next_point < len(eval_points) and examples_seen >= eval_points[next_point]:
                    train_seconds += time.perf_counter() - tick
                    # One evaluation per optimizer step, reported at the last point this step crossed
                    # (a batch larger than the interval between points crosses several).
                    while next_point < len(eval_points) and examples_seen >= eval_points[next_point]:
                        next_point += 1
                    step = eval_points[next_point - 1]
                    if stop_at_examples is not None:
                        done = True
                        break
                    evaluation = evaluate_dev(step)
                    running_loss, running_count = 0.0, 0
                    history.append(evaluation)
                    value, best_value = evaluation.metrics[metric], best and best.metrics[metric]
                    # Patience counts evaluations that do not beat the best by min delta; the best is the best.
                    patient = better(value, best_value, direction, hp.early_stopping_min_delta)
                    since_best = 0 if patient else since_best + 1
                    if better(value, best_value, direction):
                        best = evaluation
                        best.weights_sha256 = weights_digest(model)
                        if checkpoint is not None:
                            checkpoint.remember_best(model)
                    stop = hp.early_stopping_patience is not None and since_best >= hp.early_stopping_patience
                    evaluation.last = stop or next_point >= len(eval_points)
                    # The checkpoint comes before the report, so a report can hand it over (Ray Tune's
                    # tune.report takes the checkpoint with the metrics); a trial the report prunes may have
                    # written one for nothing, within checkpoint.max_overhead.
                    if checkpoint is not None and not stop and next_point < len(eval_points) and checkpoint.due():
                        save_checkpoint(epoch)
                    if on_eval is not None:
                        on_eval(evaluation)  # may raise optuna.TrialPruned
                    if stop:
                        stopped_early = done = True
                        break
                    tick = time.perf_counter()
            else:
                train_seconds += time.perf_counter() - tick
            if done:
                break

        result = TrainResult(
            best=best,
            history=history,
            stopped_early=stopped_early,
            train_time_s=time.perf_counter() - start,
            examples_per_second=examples_seen / max(train_seconds, 1e-9),
            n_params=sum(p.numel() for p in model.parameters()),
            peak_memory_mb=0.0,
            peak_memory_kind="",
            device=str(device),
            torch_threads=torch.get_num_threads(),
            setup_seconds=setup_seconds,
            train_seconds=train_seconds,
            eval_seconds=eval_seconds,
            runtime=runtime_attrs(cfg, params, runtime),
        )
        if checkpoint is not None:
            checkpoint.finish()
            result.checkpoints_written, result.checkpoint_seconds = checkpoint.written, checkpoint.seconds
        if stop_at_examples is not None:
            result.final = evaluate_dev(stop_at_examples)
            if evaluate_test:
                result.test_metrics = evaluate(model, eval_loader("test"), features, "test", runtime)
        result.peak_memory_mb, result.peak_memory_kind = _peak_memory(device)
        if keep_model:
            result.model = model.cpu()
        return result
    except torch.OutOfMemoryError as e:
        raise TrialFailure(
            f"out of memory on {device}: {str(e).splitlines()[0]} (batch_size={hp.batch_size})"
        ) from None
    finally:
        # Drop the frame's own references too: a traceback that outlives the trial keeps its frame alive.
        model = optimizer = scheduler = scaler = train_loader = dev_loader = tokenizer = sampler = generator = saved = (
            None
        )
        state.clear()
        torch.set_num_threads(threads_before)
        torch.set_float32_matmul_precision(matmul_precision_before)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
