"""Every knob of the training recipe, declared once: the fields of ``TrainConfig`` (the study's ``train:``).

Each field carries its own declaration (PEFT style): its type (the annotation), default, help, domain, whether
a search space may name it, what in the recipe uses it and whether Ray's PBT may change it in a running trial.
Read from here by the ``train:`` section (types, defaults, checks), by the search-space parser
(``search/spaces``: which names are searchable, and each value's type and domain) and by the README's
``train`` table (tests/test_readme.py writes and checks it).

A searched value reaches the recipe the way a fixed one does: it replaces the ``TrainConfig`` field of its name
(``TrainConfig.with_params``), which the recipe reads. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from llmflow_hpo.config.typed import MISSING, Problems, convert, type_name

__all__ = [
    "HYPERPARAMETERS",
    "TRAIN_SETTINGS",
    "Bounds",
    "Hyperparameter",
    "Rule",
    "TrainConfig",
    "clip_norm",
]

SchedulerName = Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial"]
OptimizerName = Literal["adamw", "sgd", "adafactor"]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
LossName = Literal["cross_entropy", "focal"]
ClassWeighting = Literal["none", "balanced"]
AdapterName = Literal["none", "lora"]
QuantizationName = Literal["none", "4bit"]
# The target presets of train.lora_targets (recipe/adapters.py resolves them on the model).
LORA_TARGET_PRESETS = ("attention", "attention-mlp", "all-linear")


def _lora_targets_ok(value: str) -> bool:
    names = [name.strip() for name in value.split(",")]
    return value in LORA_TARGET_PRESETS or all(name and " " not in name for name in names)


# ----------------------------------------------------------------------------------------------------
# Domains: the values of a setting's type that it takes.


@dataclass(frozen=True)
class Bounds:
    """A number's range: from ``low`` (included or not) up to ``high`` (excluded), or with no upper end."""

    low: float
    high: float | None = None
    low_included: bool = True

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>=' if self.low_included else '>'} {self.low:g}"
        return f"in {'[' if self.low_included else '('}{self.low:g}, {self.high:g})"

    def problem(self, value: Any, null: str | None) -> str | None:
        """Why ``value`` (of the setting's type) is outside, or None; ``null``: how a message offers null."""
        low_ok = value >= self.low if self.low_included else value > self.low
        if low_ok and (self.high is None or value < self.high):
            return None
        return f"must be {self}" + (f" or {null}" if null else "")


@dataclass(frozen=True)
class Rule:
    """A domain a range cannot say: ``test`` decides, ``text`` names the values taken."""

    text: str
    test: Callable[[Any], bool]

    def __str__(self) -> str:
        return self.text

    def problem(self, value: Any, null: str | None) -> str | None:
        return None if self.test(value) else f"got {value!r}; use {self.text}"


def at_least(low: float) -> Bounds:
    """``>= low``."""
    return Bounds(low)


def above(low: float) -> Bounds:
    """``> low``."""
    return Bounds(low, low_included=False)


FRACTION = Bounds(0.0, 1.0)  # [0, 1): ratios, dropouts, momentum
DEVICE = Rule("auto, cpu, cuda or cuda:N", lambda d: d in ("auto", "cpu", "cuda") or d.startswith("cuda:"))


def _declare(
    help: str,
    used_by: str,
    domain: Bounds | Rule | None,
    *,
    searchable: bool,
    mutable: bool = False,
    null: str = "null",
) -> dict[str, Any]:
    return {
        "help": help,
        "used_by": used_by,
        "domain": domain,
        "searchable": searchable,
        "mutable": mutable,
        "null": null,
    }


def searchable(
    help: str, used_by: str, domain: Bounds | Rule | None = None, *, mutable: bool = False, null: str = "null"
) -> dict[str, Any]:
    """The declaration (field metadata) of a hyperparameter a search space may name.

    ``used_by``: what in the recipe reads it. ``mutable``: Ray's PBT may change it in a running trial (it
    changes neither the model's shape, nor the optimizer's kind, nor the length of the run). ``null``: how a
    message names the null value of a nullable setting.
    """
    return _declare(help, used_by, domain, searchable=True, mutable=mutable, null=null)


def fixed(help: str, used_by: str, domain: Bounds | Rule | None = None, *, null: str = "null") -> dict[str, Any]:
    """The declaration (field metadata) of a setting of the recipe that only ``train:`` sets."""
    return _declare(help, used_by, domain, searchable=False, null=null)


# ----------------------------------------------------------------------------------------------------
# The declarations.


@dataclass
class TrainConfig:
    """The study's ``train:`` section: each hyperparameter's fixed value, unless the search space names it."""

    learning_rate: float = field(
        default=1e-4, metadata=searchable("Peak learning rate.", "optimizer, schedule", above(0), mutable=True)
    )
    batch_size: int = field(
        default=8, metadata=searchable("Training batch size (examples per optimizer step).", "batches", at_least(1))
    )
    epochs: int = field(
        default=3,
        metadata=searchable(
            "Maximum number of epochs (early stopping may end a trial sooner).", "length of the run", at_least(1)
        ),
    )
    warmup_ratio: float = field(
        default=0.0,
        metadata=searchable(
            "Fraction of the training steps spent warming the learning rate up.", "schedule", FRACTION, mutable=True
        ),
    )
    scheduler: SchedulerName = field(
        default="linear",
        metadata=searchable(
            "Learning-rate schedule after warmup; constant takes no warmup (use constant_with_warmup).", "schedule"
        ),
    )
    optimizer: OptimizerName = field(
        default="adamw", metadata=searchable("adamw, sgd (with momentum) or adafactor.", "optimizer")
    )
    momentum: float = field(default=0.9, metadata=searchable("sgd momentum.", "optimizer", FRACTION, mutable=True))
    weight_decay: float = field(
        default=0.0,
        metadata=searchable(
            "Decoupled weight decay (not applied to biases and LayerNorm).", "optimizer", at_least(0), mutable=True
        ),
    )
    hidden_dropout: float | None = field(
        default=None,
        metadata=searchable(
            "Hidden-layer dropout; null keeps the model's own.", "model config", FRACTION, mutable=True
        ),
    )
    attention_dropout: float | None = field(
        default=None,
        metadata=searchable("Attention dropout; null keeps the model's own.", "model config", FRACTION, mutable=True),
    )
    num_layers: int | None = field(
        default=None,
        metadata=searchable(
            "Keep only the first N transformer layers of the encoder (its pretrained weights for them; the others "
            "are dropped): a smaller, faster model, the knob a cost study (objective.cost) trades quality for; "
            "null keeps them all. At most the model's own number of layers.",
            "model config",
            at_least(1),
            null="null (all of them)",
        ),
    )
    label_smoothing: float = field(
        default=0.0, metadata=searchable("Label smoothing of the cross-entropy loss.", "loss", FRACTION, mutable=True)
    )
    max_grad_norm: float | None = field(
        default=1.0,
        metadata=searchable(
            "Gradient clipping norm; null or 0 (fixed or searched) turns clipping off.",
            "gradient clipping",
            at_least(0),
            mutable=True,
        ),
    )
    loss: LossName = field(
        default="cross_entropy", metadata=searchable("cross_entropy or focal (for imbalanced labels).", "loss")
    )
    focal_gamma: float = field(
        default=2.0, metadata=searchable("Focal loss gamma (loss: focal).", "loss", at_least(0), mutable=True)
    )
    class_weighting: ClassWeighting = field(
        default="none",
        metadata=searchable(
            "balanced weighs each position by its target class's n_examples / (n_classes * n_class); the loss is "
            "the weighted mean, and label smoothing stays uniform over the classes.",
            "loss",
        ),
    )
    adapter: AdapterName = field(
        default="none",
        metadata=searchable(
            "none: full fine-tuning (every weight trains); lora: a LoRA adapter (PEFT) on the lora_targets, the base "
            "frozen, the task's head (classifier) trained fully. Search both as a categorical to compare them.",
            "model",
        ),
    )
    lora_r: int = field(default=8, metadata=searchable("LoRA rank (adapter: lora).", "model", at_least(1)))
    lora_alpha: float | None = field(
        default=None,
        metadata=searchable(
            "LoRA alpha (the adapter's scale is alpha / r, or alpha / sqrt(r) with lora_rslora); null: "
            "lora_alpha_ratio x r.",
            "model",
            above(0),
            null="null (lora_alpha_ratio x lora_r)",
        ),
    )
    lora_alpha_ratio: float = field(
        default=2.0,
        metadata=searchable(
            "alpha / r when lora_alpha is null (alpha = 2r is the usual rule): searching it keeps the scale "
            "apart from the rank.",
            "model",
            above(0),
        ),
    )
    lora_dropout: float = field(
        default=0.05, metadata=searchable("Dropout on the LoRA adapter's input.", "model", FRACTION)
    )
    lora_targets: str = field(
        default="all-linear",
        metadata=searchable(
            "The layers that get an adapter: attention (the attention projections), attention-mlp (every linear "
            "layer of the transformer blocks), all-linear (PEFT's: every linear layer but the output head), or "
            "module names, comma-separated (q_proj,v_proj).",
            "model",
            Rule("attention, attention-mlp, all-linear or module names (q_proj,v_proj)", _lora_targets_ok),
        ),
    )
    lora_rslora: bool = field(
        default=False, metadata=searchable("Rank-stabilized LoRA: scale alpha / sqrt(r) instead of alpha / r.", "model")
    )
    lora_dora: bool = field(
        default=False,
        metadata=searchable("DoRA: the adapter learns each weight's magnitude and direction apart (slower).", "model"),
    )
    lora_train_embeddings: bool = field(
        default=False,
        metadata=fixed(
            "adapter: lora: the input embeddings train fully too (tied output weights with them); they stay frozen "
            "by default.",
            "model",
        ),
    )
    quantization: QuantizationName = field(
        default="none",
        metadata=fixed(
            "4bit: QLoRA, the frozen base loaded in 4-bit NF4 through bitsandbytes (adapter: lora, a CUDA GPU).",
            "model",
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=fixed(
            "Recompute activations in the backward pass instead of keeping them: less memory, about a third "
            "more time per step.",
            "runtime",
        ),
    )
    # Fixed settings of the recipe.
    evals_per_epoch: int = field(
        default=2,
        metadata=fixed("Dev evaluations per epoch (each is reported to the pruner).", "evaluation points", at_least(1)),
    )
    eval_batch_size: int = field(
        default=64,
        metadata=fixed(
            "Batch size for evaluation (no gradients are kept; examples taken longest first, so batches pad little).",
            "evaluation",
            at_least(1),
        ),
    )
    group_by_length: bool = field(
        default=True,
        metadata=fixed(
            "Batch examples of similar length together (shuffled in groups of 50 batches, as the Hugging Face "
            "Trainer's group_by_length), so dynamic padding pads little; false draws batches uniformly at random.",
            "batches",
        ),
    )
    precision: PrecisionName = field(
        default="auto",
        metadata=fixed(
            "auto: bf16 autocast on a GPU that has it, else fp16 with loss scaling on a GPU, fp32 on CPU. "
            "fp16 needs a GPU. On a GPU, TF32 matmuls and pinned memory come with it; each trial records what it "
            "ran with (`precision`, `tf32`, `fused_optimizer`, `pin_memory`, `group_by_length`).",
            "runtime",
        ),
    )
    fused_optimizer: bool = field(
        default=True,
        metadata=fixed(
            "AdamW with torch's fused kernel (one kernel over all parameters, on CPU and GPU; on 2 CPU cores its "
            "step is about 4.7x faster than torch's default foreach kernel for a 22M-parameter model); false: "
            "the foreach kernel. Other optimizers are not affected.",
            "runtime",
        ),
    )
    early_stopping_patience: int | None = field(
        default=3,
        metadata=fixed(
            "Stop a trial after this many evaluations without improvement; null turns it off.",
            "early stopping",
            at_least(1),
            null="null (off)",
        ),
    )
    early_stopping_min_delta: float = field(
        default=0.0,
        metadata=fixed(
            "Smallest gain over the best so far that resets early stopping's patience; the trial's best evaluation "
            "is its best, whatever this is.",
            "early stopping",
            at_least(0),
        ),
    )
    device: str = field(
        default="auto", metadata=fixed("auto (cuda when present, else cpu), cpu, cuda or cuda:N.", "runtime", DEVICE)
    )
    num_threads: int | None = field(
        default=None, metadata=fixed("CPU threads for torch; null keeps torch's default.", "runtime", at_least(1))
    )

    def evaluation_points(self, n_train: int) -> list[int]:
        """Where a run of ``n_train`` training examples evaluates on dev, in examples seen (the pruner's
        steps): ``evals_per_epoch`` times an epoch, at the same positions whatever the batch size."""
        return [round(n_train * k / self.evals_per_epoch) for k in range(1, self.epochs * self.evals_per_epoch + 1)]

    def with_params(self, params: Mapping[str, Any]) -> TrainConfig:
        """The settings a trial runs with: its searched ``params`` replace the fixed values of their names."""
        return dataclasses.replace(self, **params)

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for each value outside its domain, then the settings that do not go together."""
        found = []
        for hp in TRAIN_SETTINGS.values():
            why = hp.check(getattr(self, hp.name))
            if why:
                found.append((f"train.{hp.name}", why))
        if self.precision == "fp16" and self.device == "cpu":
            found.append(
                ("train.precision", "fp16 needs a GPU (loss scaling is a CUDA feature); use fp32 or bf16 on cpu")
            )
        if self.quantization == "4bit" and self.adapter != "lora":
            found.append(
                ("train.quantization", "4bit trains an adapter on a frozen 4-bit base; set train.adapter: lora")
            )
        if self.quantization == "4bit" and self.device == "cpu":
            found.append(("train.quantization", "4bit (QLoRA, bitsandbytes) needs a CUDA GPU; use none on cpu"))
        return found


def clip_norm(max_grad_norm: float | None) -> float | None:
    """The one rule for ``max_grad_norm``, fixed or searched: 0 or null turns clipping off."""
    return max_grad_norm or None


# ----------------------------------------------------------------------------------------------------
# The declarations as objects: what the search-space parser and the README read.


@dataclass(frozen=True)
class Hyperparameter:
    """One ``TrainConfig`` field's declaration."""

    name: str
    type: Any
    default: Any
    help: str
    domain: Bounds | Rule | None  # None: every value of the type (a Literal names its own)
    searchable: bool
    used_by: str  # what in the recipe reads it
    mutable: bool  # Ray's PBT may change it in a running trial
    null: str  # how a message names null, where the type takes it

    @property
    def type_name(self) -> str:
        return type_name(self.type)

    @property
    def nullable(self) -> bool:
        return type(None) in typing.get_args(self.type)

    def check(self, value: Any) -> str | None:
        """Why ``value``, already of this setting's type, is outside its domain, or None."""
        if value is None or self.domain is None:
            return None
        return self.domain.problem(value, self.null if self.nullable else None)

    def coerce(self, value: Any) -> tuple[Any, str | None]:
        """``value`` converted to this setting's type ("1e-5" to a float), and why it is invalid (None: valid)."""
        problems = Problems("")
        converted = convert(value, self.type, self.name, problems)
        if converted is MISSING:
            return value, problems.messages[0]
        return converted, self.check(converted)


def _declarations() -> dict[str, Hyperparameter]:
    hints = typing.get_type_hints(TrainConfig)
    return {
        f.name: Hyperparameter(name=f.name, type=hints[f.name], default=f.default, **f.metadata)
        for f in dataclasses.fields(TrainConfig)
    }


# Every train: setting, in the order of TrainConfig's fields.
TRAIN_SETTINGS: Mapping[str, Hyperparameter] = _declarations()
# The names a search space may use, and their declarations.
HYPERPARAMETERS: Mapping[str, Hyperparameter] = {n: hp for n, hp in TRAIN_SETTINGS.items() if hp.searchable}
