"""The trial record: every user attribute a trial (and a study) of llmflow-hpo may carry, declared once.

Each attribute is declared with its help text, its kind and whether the report shows it as a column
(the PEFT style of fields that carry their own help). What reads the attributes is derived from here:
the dashboard note (``study.note``), the report's columns (``views.report``), the tracking split into
metrics and tags (``views.tracking``) and the README's table (checked by tests/study/test_records.py).
Code spells an attribute through its constant (``records.BEST_STEP``), never as a string literal.

Kinds, which is what experiment tracking does with the attribute when the trial ends:

- ``metric``: a number that measures the run; logged as a metric of the trial's run;
- ``tag``: what happened to the trial or where it ran; logged as the tag ``llmflow.NAME``;
- ``run``: run information (a setting it ran with, a number that names something, a hash, a list):
  stored in the study only, for ``retrain-best``, the dashboard and the report.

The names and the stored values are a storage format: studies stored by earlier versions use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "STUDY_ATTRS",
    "TRIAL_ATTRS",
    "TRIAL_GROUPS",
    "Attr",
    "Group",
    "dev",
    "is_score",
    "kind_of",
    "report_columns",
    "study_table",
    "tag_names",
    "test",
    "tracked_as_metric",
    "trial_table",
]

Kind = Literal["metric", "tag", "run"]

# ---------------------------------------------------------------------------------------- the names

DEV_PREFIX = "dev_"  # dev_{metric}: every dev metric of the best evaluation
TEST_PREFIX = "test_"  # test_{metric}: test metrics, where a study holds them

BEST_STEP = "best_step"
BEST_OPTIMIZER_STEP = "best_optimizer_step"
BEST_EPOCH = "best_epoch"
BEST_WEIGHTS_SHA256 = "best_weights_sha256"
BEST_SAMPLES = "best_samples"
EVALUATIONS = "evaluations"
STOPPED_EARLY = "stopped_early"
TRAIN_TIME_S = "train_time_s"
SETUP_S = "setup_s"
TRAIN_S = "train_s"
EVAL_S = "eval_s"
EXAMPLES_PER_SECOND = "examples_per_second"
N_PARAMS = "n_params"
N_TRAINABLE = "n_trainable"
LATENCY_MS = "latency_ms"
PEAK_MEMORY_MB = "peak_memory_mb"
PEAK_MEMORY_KIND = "peak_memory_kind"
DEVICE = "device"
PRECISION = "precision"
TF32 = "tf32"
FUSED_OPTIMIZER = "fused_optimizer"
PIN_MEMORY = "pin_memory"
GROUP_BY_LENGTH = "group_by_length"
TORCH_THREADS = "torch_threads"
SEED = "seed"
WORKER = "worker"
PRUNED_AT_STEP = "pruned_at_step"
FAIL_REASON = "fail_reason"
FAILED_FOR_GOOD = "failed_for_good"
RETRY_OF = "retry_of"
RESUMED_AT_STEP = "resumed_at_step"
RESUMED_AT_OPTIMIZER_STEP = "resumed_at_optimizer_step"
CHECKPOINT_TRIAL = "checkpoint_trial"
CHECKPOINTS_WRITTEN = "checkpoints_written"
CHECKPOINT_S = "checkpoint_s"
BACKEND = "backend"
RAY_TRIAL_ID = "ray_trial_id"
RAY_RUN = "ray_run"
RAY_FAILURES = "ray_failures"
STOPPED_BY = "stopped_by"
PBT_SCHEDULE = "pbt_schedule"
# The confirmation stage (search/confirm.py): a confirmation trial re-runs one search trial's configuration.
CONFIRMS = "confirms"
CONFIRM_SEEDS = "confirm_seeds"
CONFIRM_SCORES = "confirm_scores"
CONFIRM_MEAN = "confirm_mean"
CONFIRM_STD = "confirm_std"
CONFIRM_LCB = "confirm_lcb"
CONFIRM_SELECT = "confirm_select"
CONFIRM_CONFIDENCE = "confirm_confidence"

# Where a trial's parameters came from (search/first_trials.py, search/startup.py) and how a budget ended it.
ORIGIN = "origin"
DESIGN_POINT = "design_point"
DESIGN_LENGTH = "design_length"
WARM_START_FROM = "warm_start_from"
STOPPED_BY_BUDGET = "stopped_by_budget"

# The study's own user attributes.
CONFIG = "config"
SEARCH_SPACE = "search_space"
DATA_REPORT = "data_report"
METRIC = "metric"
VERSIONS = "versions"
MLFLOW = "mlflow"


def dev(metric: str) -> str:
    """The user attribute (and optuna metric name) of a dev metric: ``dev_f1``."""
    return f"{DEV_PREFIX}{metric}"


def test(metric: str) -> str:
    """The user attribute of a test metric: ``test_f1``."""
    return f"{TEST_PREFIX}{metric}"


test.__test__ = False  # type: ignore[attr-defined]  # not a test function for pytest


def is_score(name: str) -> bool:
    """A dev or test metric (``dev_*``, ``test_*``)."""
    return name.startswith((DEV_PREFIX, TEST_PREFIX))


# ---------------------------------------------------------------------------------------- the declaration


@dataclass(frozen=True)
class Attr:
    """One user attribute: its name (``dev_*`` for a family), kind, help text and report column."""

    name: str
    kind: Kind
    help: str
    column: bool = False  # a column of the report's table of best trials


@dataclass(frozen=True)
class Group:
    """Attributes the dashboard note explains on one line (``note``; None: not in the note)."""

    attrs: tuple[Attr, ...]
    note: str | None
    ray_only: bool = False  # written by the Ray backend only: in the note of a Ray study


TRIAL_GROUPS: tuple[Group, ...] = (
    Group(
        (
            Attr(
                DEV_PREFIX + "*",
                "metric",
                "every dev metric of the trial's best evaluation (`dev_f1`, `dev_precision`, ... or `dev_accuracy`, "
                "`dev_macro_f1`, ...; per entity type `dev_f1_PER`, ...)",
                column=True,
            ),
        ),
        "every dev metric of the trial's best evaluation (`dev_{metric}` is the trial's value)",
    ),
    Group(
        (
            Attr(
                TEST_PREFIX + "*",
                "metric",
                "test metrics: search writes none (the test split is retrain-best's); the report shows any a study holds",
                column=True,
            ),
        ),
        None,
    ),
    Group(
        (
            Attr(BEST_STEP, "metric", "training examples seen at the best evaluation (the curves' unit)", column=True),
            Attr(BEST_OPTIMIZER_STEP, "metric", "optimizer steps taken at the best evaluation"),
            Attr(BEST_EPOCH, "metric", "epochs at the best evaluation (4 decimals)", column=True),
        ),
        "when that best evaluation happened (examples seen, optimizer steps, epochs)",
    ),
    Group(
        (
            Attr(
                BEST_WEIGHTS_SHA256,
                "run",
                "SHA-256 of the weights at the best evaluation (retrain-best compares its model's)",
            ),
        ),
        "SHA-256 of the weights at that evaluation (retrain-best compares its model's)",
    ),
    Group(
        (
            Attr(
                BEST_SAMPLES,
                "run",
                "causal-lm: a few dev prompts with their reference and generated answers at the best evaluation",
            ),
        ),
        "causal-lm: a few dev prompts with their reference and generated answers at that evaluation",
    ),
    Group(
        (
            Attr(EVALUATIONS, "metric", "dev evaluations run", column=True),
            Attr(STOPPED_EARLY, "run", "whether early stopping ended the trial", column=True),
        ),
        "dev evaluations run; whether early stopping ended the trial",
    ),
    Group(
        (
            Attr(TRAIN_TIME_S, "metric", "seconds of the whole run", column=True),
            Attr(SETUP_S, "metric", "seconds of set-up (model and loaders) before the first batch", column=True),
            Attr(TRAIN_S, "metric", "seconds of training steps", column=True),
            Attr(EVAL_S, "metric", "seconds of dev evaluations", column=True),
        ),
        "seconds: the whole run; set-up before the first batch; training steps; dev evaluations",
    ),
    Group(
        (
            Attr(EXAMPLES_PER_SECOND, "metric", "training throughput", column=True),
            Attr(N_PARAMS, "metric", "the model's parameter count"),
            Attr(
                N_TRAINABLE,
                "metric",
                "the parameters that train (an adapter's and the head's with train.adapter: lora)",
            ),
            Attr(
                LATENCY_MS,
                "metric",
                "studies with `objective.cost: latency_ms`: inference latency per dev example, ms (batch size 1)",
                column=True,
            ),
        ),
        "training throughput; the model's parameter count; its inference latency per example (cost studies)",
    ),
    Group(
        (
            Attr(PEAK_MEMORY_MB, "metric", "peak memory of the run, MB", column=True),
            Attr(PEAK_MEMORY_KIND, "run", "what was measured: CUDA max allocated, or the process's max RSS on CPU"),
        ),
        "peak memory of the run and what was measured (CUDA max allocated or process max RSS)",
    ),
    Group(
        (
            Attr(DEVICE, "tag", "the device it trained on"),
            Attr(PRECISION, "run", "fp32, bf16 or fp16"),
            Attr(TF32, "run", "whether TF32 matmuls were allowed"),
            Attr(FUSED_OPTIMIZER, "run", "whether AdamW ran torch's fused kernel"),
            Attr(PIN_MEMORY, "run", "whether the loaders pinned memory"),
            Attr(GROUP_BY_LENGTH, "run", "whether batches were grouped by length"),
            Attr(TORCH_THREADS, "metric", "torch's CPU thread count"),
        ),
        "how the trial ran",
    ),
    Group(
        (
            Attr(SEED, "run", "the training seed"),
            Attr(WORKER, "tag", "host:pid of the worker that ran the trial"),
        ),
        "the training seed; host:pid of the worker that ran the trial",
    ),
    Group(
        (Attr(PRUNED_AT_STEP, "tag", "pruned trials: the step the pruner stopped them at"),),
        "pruned trials: the step the pruner stopped them at",
    ),
    Group(
        (
            Attr(FAIL_REASON, "tag", "failed trials: why"),
            Attr(FAILED_FOR_GOOD, "run", "failed trials: whether a retry is pointless"),
        ),
        "failed trials: why; whether a retry is pointless",
    ),
    Group(
        (
            Attr(
                RETRY_OF,
                "tag",
                "a retry of a dead or interrupted trial: the attempt it repeats (optuna's own `retry_history` is in "
                "the trial's system attributes)",
            ),
            Attr(RESUMED_AT_STEP, "tag", "a retry: the step (examples seen) it resumed from"),
            Attr(RESUMED_AT_OPTIMIZER_STEP, "run", "a retry: the optimizer step it resumed from"),
        ),
        "retries of a dead or interrupted trial: its number; the step it resumed from (examples seen, optimizer steps)",
    ),
    Group(
        (
            Attr(CHECKPOINT_TRIAL, "run", "the trial whose folder holds its checkpoint"),
            Attr(CHECKPOINTS_WRITTEN, "metric", "checkpoints written"),
            Attr(CHECKPOINT_S, "metric", "seconds spent writing checkpoints"),
        ),
        "checkpointing: whose folder, how many written, seconds spent",
    ),
    Group(
        (
            Attr(
                ORIGIN,
                "tag",
                "where the parameters came from: `defaults` (the recipe's, projected into the space), `warm-start` "
                "(an earlier study's), `design` (the start-up design); none: the sampler",
                column=True,
            ),
            Attr(DESIGN_POINT, "run", "a start-up design trial: its point's index in the Latin hypercube"),
            Attr(
                DESIGN_LENGTH,
                "run",
                "a start-up design trial: the hypercube's strata, fixed by the study's first design trial",
            ),
            Attr(WARM_START_FROM, "run", "a warm-start trial: the earlier study and trial it repeats (`study#N`)"),
            Attr(STOPPED_BY_BUDGET, "tag", "the search's budget ran out: the trial stopped there, keeping its best"),
        ),
        "where the parameters came from (`defaults`, `warm-start`, `design`, or the sampler); the design point, the "
        "earlier study's trial; whether the budget stopped the trial",
    ),
    Group(
        (
            Attr(BACKEND, "run", "`ray` on trials Ray Tune ran"),
            Attr(RAY_TRIAL_ID, "run", "Ray Tune's trial id"),
            Attr(RAY_RUN, "run", "the Ray Tune run the trial belongs to"),
            Attr(RAY_FAILURES, "run", "how many times the trial failed under Ray Tune"),
            Attr(STOPPED_BY, "run", "pruned trials: the Ray scheduler that stopped them"),
            Attr(PBT_SCHEDULE, "run", "PBT's changes: the step and the new parameters of each"),
        ),
        "backend ray: Ray Tune's trial id and run, its failures, the scheduler that stopped it, PBT's changes",
        ray_only=True,
    ),
    Group(
        (
            Attr(
                CONFIRMS,
                "tag",
                "a confirmation trial (`llmflow-hpo confirm`): the search trial whose configuration it re-runs; "
                "its intermediate value at step i is seed i's score",
            ),
            Attr(CONFIRM_SEEDS, "run", "confirmation: the training seeds, in order (step i = seed i)"),
            Attr(
                CONFIRM_SCORES,
                "run",
                "confirmation: each seed's score, the dev metric of its best evaluation, for the seeds run",
            ),
            Attr(CONFIRM_MEAN, "metric", "confirmation: the mean of the scores"),
            Attr(CONFIRM_STD, "metric", "confirmation: their sample standard deviation"),
            Attr(
                CONFIRM_LCB,
                "metric",
                "confirmation: the one-sided confidence bound of the mean on the losing side, "
                "mean - t(confidence, K-1) sd / sqrt(K) (+ when minimizing)",
            ),
            Attr(CONFIRM_SELECT, "run", "confirmation: the trial's value, `mean` or `lcb` (the selection rule)"),
            Attr(CONFIRM_CONFIDENCE, "run", "confirmation: the confidence level of the bound"),
        ),
        "confirmation trials (`llmflow-hpo confirm`): the search trial whose configuration it re-runs, the seeds "
        "(step i = seed i), each seed's best dev score, their mean, standard deviation and pessimistic confidence "
        "bound, which of them is the trial's value (the selection rule) and the bound's level",
    ),
)
TRIAL_ATTRS: tuple[Attr, ...] = tuple(a for g in TRIAL_GROUPS for a in g.attrs)

STUDY_ATTRS: tuple[Attr, ...] = (
    Attr(CONFIG, "run", "the resolved study config"),
    Attr(SEARCH_SPACE, "run", "the search space, as the file says it"),
    Attr(
        DATA_REPORT,
        "run",
        "what reading the data found: what cleaning removed or truncation cut, the splits, the labels",
    ),
    Attr(METRIC, "run", "the objective's dev metric, e.g. `f1`"),
    Attr(VERSIONS, "run", "llmflow-hpo, optuna, torch, transformers and datasets that made the study"),
    Attr(MLFLOW, "run", "with MLflow tracking: the tracking URI, experiment and run id of the study's run"),
)

_BY_NAME = {a.name: a for a in TRIAL_ATTRS}


# ---------------------------------------------------------------------------------------- what follows


def kind_of(name: str) -> Kind | None:
    """The declared kind of a trial attribute (``dev_*``/``test_*`` by prefix); None when undeclared."""
    if name.startswith(DEV_PREFIX):
        return _BY_NAME[DEV_PREFIX + "*"].kind
    if name.startswith(TEST_PREFIX):
        return _BY_NAME[TEST_PREFIX + "*"].kind
    attr = _BY_NAME.get(name)
    return attr.kind if attr is not None else None


def tracked_as_metric(name: str, value: Any) -> bool:
    """Whether tracking logs the attribute as a metric: a number of kind metric (or of no declared kind,
    as an attribute a later version added)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and kind_of(name) in ("metric", None)


def tag_names() -> tuple[str, ...]:
    """The trial attributes tracking logs as tags, in declaration order."""
    return tuple(a.name for a in TRIAL_ATTRS if a.kind == "tag")


def report_columns(present: set[str]) -> list[str]:
    """The report's metric columns among the attributes ``present``: dev/test metrics sorted, then the
    declared columns in declaration order."""
    scores = sorted(k for k in present if is_score(k))
    return scores + [a.name for a in TRIAL_ATTRS if a.column and "*" not in a.name and a.name in present]


def trial_table() -> str:
    """The README's table of the trial attributes: name, kind, report column, meaning (one row each)."""
    rows = ["| attribute | kind | report column | meaning |", "|---|---|---|---|"]
    rows += [f"| `{a.name}` | {a.kind} | {'yes' if a.column else ''} | {a.help} |" for a in TRIAL_ATTRS]
    return "\n".join(rows)


def study_table() -> str:
    """The README's table of the study's own attributes: name, meaning."""
    rows = ["| attribute | meaning |", "|---|---|"]
    rows += [f"| `{a.name}` | {a.help} |" for a in STUDY_ATTRS]
    return "\n".join(rows)
