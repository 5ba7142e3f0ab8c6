"""The contract of a task: everything in the package that depends on which task a study runs.

A task is one object (``tasks.TASKS[name]``) of a subclass of ``BaseTask``. The rest of the package
never compares the task name: it asks the study's task object, at the moments the docstrings below
name. Importing a task module imports neither torch nor transformers: the methods that need them
import them when they are called.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

from llmflow_hpo.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "BaseTask",
    "Cleaner",
    "ScoredFeatures",
    "clean_text",
    "json_field",
    "label_report",
    "record_fields",
    "unknown_labels_message",
]

IGNORE_INDEX = -100  # label of the positions the loss skips (special tokens, non-first subwords, padding)


class Cleaner(Protocol):
    """What an example's ``cleaned(clean, source, number)`` method is handed by ``data.clean.clean_examples``,
    once per example read: ``clean(value)`` is the string in the study's Unicode form, stripped, with
    whitespace runs made one space (the cleaner notes what changed); ``count(what)`` counts a part of the
    example dropped (reported as cleaning's lines). Each task's example class has that method: it returns the
    clean example, or None to drop it (after ``count("empty")`` when nothing is left of it)."""

    def __call__(self, value: str) -> str: ...

    def count(self, what: str) -> None: ...


class ScoredFeatures(Protocol):
    """What ``BaseTask.score`` reads of a study's features (``data.features.Features``; the tasks import
    nothing of the data stage, which imports them)."""

    labels: list[str]
    splits: dict[str, Any]

    def gold_tags(self, split: str) -> list[list[str]]: ...

    def gold_labels(self, split: str) -> list[str]: ...


class BaseTask(abc.ABC):
    """One task: its data, its features, its model head, its metrics, its predictions and its card.

    The class attributes are read whenever the task's facts are needed (validate, reading, the card):

    - ``name``: the ``task:`` value of a study config that selects this task.
    - ``formats``: the ``data.format`` values it reads (validate and ``load_splits`` refuse others).
    - ``unit``: what one example is called in the data report ("sentence", "example").
    - ``label_field``: the config field that holds the labels, named when the train split has one label.
    - ``stratify``: whether a dev or test split carved from train is stratified by label.
    - ``metrics``: the metrics ``objective.metric`` may name, ``"loss"`` included (the dev loss, minimised).
    - ``default_metric``: the objective when the config names none.
    - ``model_card_class``: the transformers Auto class the model card's usage snippet loads the model with.
    - ``scoring_columns``: the feature columns (of ``tokenize``) that the task's ``score`` reads, kept out of
      the model's inputs (``recipe.batches.ModelInputs``); none by default.
    - ``labelled``: its examples carry labels from a label set (the label checks of reading apply, the model's
      head is sized by it); False for a task that learns text (causal-lm).
    - ``peft_task_type``: PEFT's ``task_type`` for a LoRA adapter on this task's model (it decides which head
      PEFT trains fully beside the adapter: ``modules_to_save``).

    The loss is not the task's: every task trains with the cross-entropy family of the training recipe (its
    ``loss_fn``: cross-entropy or focal, optional class weights, positions labelled ``IGNORE_INDEX`` skipped),
    applied to the logits of ``model_class()`` and the ``labels`` column, as ``loss_inputs`` aligns them.
    """

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]
    unit: ClassVar[str]
    label_field: ClassVar[str]
    stratify: ClassVar[bool]
    metrics: ClassVar[tuple[str, ...]]
    default_metric: ClassVar[str]
    model_card_class: ClassVar[str]
    scoring_columns: ClassVar[tuple[str, ...]] = ()
    labelled: ClassVar[bool] = True
    peft_task_type: ClassVar[str]

    # ------------------------------------------------------------------ config (validate, before any file is read)

    def check_config(self, cfg: Any) -> list[tuple[str, str]]:
        """The problems of a study config (``config.study.StudyConfig``) that only this task sees, as
        ``(field, message)`` pairs.

        Called by the config check (validate, search, retrain-best) with every other check, so that all
        problems are reported at once; the objective's metric is checked there against ``metrics``. An
        empty list: nothing to say.
        """
        if cfg.data.format not in self.formats:
            return [("data.format", self.format_problem(cfg.data.format))]
        return []

    @abc.abstractmethod
    def format_problem(self, format: str) -> str:
        """The config check's message for a ``data.format`` this task does not read."""

    # ------------------------------------------------------------------ reading (data.splits.load_splits, no tokenizer)

    def check_record_fields(self, fields: Mapping[str, object]) -> None:
        """Called before a JSON Lines file or a table is read, with the config's field names keyed as
        ``record_example`` reads them (``text``, ``label``, ``tokens``...); raises ConfigError for one this task
        cannot use."""
        return None

    @abc.abstractmethod
    def record_example(self, path: str | Path, where: str, record: dict, fields: Mapping[str, str]) -> Any:
        """One example from one record: a JSON Lines object, or a row of a Parquet, Arrow, JSON or
        ``save_to_disk`` table (``where``: "line 3", "row 3"). It reads the fields of ``fields`` that this task
        uses (keys ``text``, ``label``, ``tokens``, ``tags``, ``prompt``, ``completion``, ``messages``); raises
        DataError for a bad record. A table's class-label ids are already their names."""

    @abc.abstractmethod
    def example_labels(self, example: Any) -> Sequence[str]:
        """The labels of one example (every tag of a sentence, or the one label of a text): the label set,
        the label counts and the checks of the train split are made of these."""

    @abc.abstractmethod
    def label_set(self, examples: list, order: Sequence[str] | None = None) -> list[str]:
        """The ordered label names of all splits' examples: label id i of the features and the model is
        ``label_set(...)[i]``. ``order``: the fixed label order of ``data.labels`` (every example's labels are
        in it by then). Called once, after reading, cleaning and the label rules."""

    def relabel(self, examples: list, rules: Any, data: Any, source: str) -> tuple[list, list[str]]:
        """The examples of one file with the label rules (``data.labels.LabelRules``) applied, and report lines
        (each starting with ``source``). Called after cleaning; raises DataError (naming ``source`` and the
        example) for a label the rules cannot take or one outside ``rules.order``. A task without labels
        has nothing to do."""
        return examples, []

    def input_key(self, example: Any) -> Any:
        """What makes two examples the same input (their text, words or prompt), to find examples that occur
        in more than one split; the whole example by default."""
        return example

    def train_problem(self, counts: Mapping[str, int]) -> str | None:
        """Why a train split with these label counts teaches nothing (beyond having one label only, which
        ``load_splits`` checks for every labelled task), or None. Called before any tokenizer is loaded."""
        return None

    def line_example(self, path: str | Path, number: int, line: str) -> Any:
        """One example from one line of a ``text`` file; only a task whose ``formats`` has text is asked."""
        raise DataError(path, f"format text does not fit task {self.name}")

    def summary(self, splits: Any) -> list[str]:
        """Report lines of this task about the splits read (``data.splits.DataSplits``): label counts, warnings.

        Called once by ``load_splits``, after the common lines (sizes, label set) and before the warnings
        about labels never seen in train."""
        return []

    # ------------------------------------------------------------------ features (data.features, a cache miss)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ConfigError if the study's tokenizer cannot make this task's features (before tokenizing)."""
        return None

    @abc.abstractmethod
    def tokenize(
        self, examples: list, tokenizer: Any, label_ids: Mapping[str, int], data: Any
    ) -> tuple[dict[str, list], list[str]]:
        """The feature columns of one split (``input_ids``..., ``labels`` and any scoring columns) and its
        report lines, as the study's ``data:`` settings (``config.study.DataConfig``: ``max_length``...) say.
        Called once per split on a cache miss of the features; the result is cached on disk (keyed by the data
        settings), so what it returns for the same input must not change without a new features format version."""

    # ------------------------------------------------------------------ model (recipe.models, search pre-flight)

    @abc.abstractmethod
    def model_class(self) -> Any:
        """The transformers Auto class (model with this task's head) that builds the trial's model, from a
        config (``from_config``) or from pretrained weights. Called when a model is built."""

    def head_config(self, labels: list[str]) -> dict[str, Any]:
        """The model config's fields for this task's head, given the label set (``AutoConfig`` keywords)."""
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }

    def batch_examples(self, batch: Mapping[str, Any]) -> int:
        """How many examples a collated batch holds (the unit of the recipe's steps): its rows by default."""
        return len(batch["labels"])

    def loss_inputs(self, logits: Any, labels: Any) -> tuple[Any, Any]:
        """The logits and the targets the loss pairs position by position (the training loss and the dev
        loss); as they come by default. A causal LM's logit at t predicts the token at t + 1."""
        return logits, labels

    # ------------------------------------------------------------ predictions (the recipe's evaluation; predict, serve)

    @abc.abstractmethod
    def collator(self, tokenizer: Any, data: Any) -> Any:
        """The collate function that pads a batch of features (labels included) for the model, as the study's
        ``data:`` settings say; called when the recipe builds its data loaders."""

    @abc.abstractmethod
    def batch_predictions(self, logits: Any, labels: Any) -> list:
        """Each example's predictions from one evaluation batch (``logits`` and the batch's ``labels``
        tensors), as plain Python values, in the batch's order. Called after every evaluation batch."""

    @abc.abstractmethod
    def score(self, features: ScoredFeatures, split: str, predictions: list) -> dict[str, float]:
        """The metrics of a split (without ``"loss"``, which the recipe adds) from the predictions of all its
        examples in the split's order (the concatenated ``batch_predictions``). Called once per evaluation."""

    def evaluate_more(
        self, model: Any, tokenizer: Any, features: ScoredFeatures, split: str, runtime: Any, cfg: Any, loss: float
    ) -> tuple[dict[str, float], list[dict[str, str]]]:
        """Metrics that need more of the model than its logits (a causal LM's generated answers) and a few
        samples of its outputs (``{"prompt", "reference", "answer"}``), from the evaluated ``model`` (in eval
        mode, under inference mode) and the split's ``loss``; ``cfg`` is the study config. Called once per
        evaluation, after ``score``; it must draw from no RNG the training uses. None by default."""
        return {}, []

    # ------------------------------------------------------------ deployment (deliver.predict: predict, serve)

    #: Whether the task's model runs as an exported ONNX graph (``--runtime onnx``): one forward pass gives its
    #: predictions. A task that generates (causal-lm) needs the PyTorch model's ``generate``.
    onnx_runtime: ClassVar[bool] = True

    @abc.abstractmethod
    def parse_input(self, value: Any, data: Any) -> Any:
        """One input to predict, from a request's item or a line of an unlabelled file: a text (``str``) for
        every task, or the task's own shape (NER: a list of words). The text is cleaned as ``data.clean`` cleans
        training text (``data``: the model's ``data:`` settings). Raises ValueError with the reason for
        anything else; ``predict`` and ``serve`` turn it into their error."""

    @abc.abstractmethod
    def example_input(self, example: Any, data: Any) -> Any:
        """The input of a labelled example read from a file (``predict --evaluate``): what ``parse_input``
        gives for it, the example already cleaned by ``data.clean``."""

    def predict(
        self, engine: Any, inputs: list, tokenizer: Any, data: Any, labels: list[str], options: Any
    ) -> list[dict[str, Any]]:
        """The predictions of ``inputs`` (of ``parse_input``), one JSON-able record each, in their order.

        ``engine`` (``deliver.engines``) runs the model: ``engine.logits(ids)`` gives each input's logits as
        a numpy array, in batches sorted by length. ``options``: ``deliver.predict.PredictOptions``
        (``max_length``, ``batch_size``, ``max_new_tokens``). By default the inputs are encoded
        (``encode_inputs``), run once, and each decoded (``decode``)."""
        encoded = self.encode_inputs(inputs, tokenizer, options.max_length)
        logits = engine.logits([e["input_ids"] for e in encoded], options.batch_size)
        return [self.decode(row, e, labels) for row, e in zip(logits, encoded, strict=True)]

    def encode_inputs(self, inputs: list, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        """Each input's ``input_ids`` (truncated to ``max_length``) and what ``decode`` needs of it."""
        raise NotImplementedError(f"{self.name} predicts through its own predict")

    def decode(self, logits: Any, encoded: dict[str, Any], labels: list[str]) -> dict[str, Any]:
        """One input's prediction record from its logits (``encoded``: its ``encode_inputs`` entry)."""
        raise NotImplementedError(f"{self.name} predicts through its own predict")

    @abc.abstractmethod
    def gold(self, example: Any, data: Any) -> Any:
        """The gold answer of a labelled example, as ``prediction_metrics`` compares it."""

    @abc.abstractmethod
    def prediction_metrics(self, gold: list, predictions: list[dict[str, Any]], cfg: Any) -> dict[str, float]:
        """The training metrics (those of ``score``) of ``predict``'s records against the gold answers (``cfg``:
        the model's study config)."""


def clean_text(value: str, data: Any) -> str:
    """A text to predict cleaned as ``data.clean`` cleans training text: Unicode form ``data.normalize_unicode``,
    ends stripped, whitespace runs made one space."""
    import unicodedata

    form = None if data.normalize_unicode in (None, "none") else data.normalize_unicode
    return " ".join((unicodedata.normalize(form, value) if form else value).split())


def record_fields(data: Any) -> dict[str, Any]:
    """The field names a record (a JSON object, a table's row) is read by, keyed as ``record_example`` reads
    them, from the study's ``data:`` settings (``config.study.DataConfig``)."""
    return {
        "text": data.text_column,
        "label": data.label_column,
        "tokens": data.tokens_field,
        "tags": data.tags_field,
        "prompt": data.prompt_field,
        "completion": data.completion_field,
        "messages": data.messages_field,
    }


def json_field(path: str | Path, where: str, record: dict, name: str) -> object:
    """The value of field ``name`` of the record at ``where`` ("line 3"), or a DataError that lists the fields."""
    if name not in record:
        found = ", ".join(sorted(record)) or "none"
        raise DataError(path, f"{where}: no field {name!r} (fields found: {found})")
    return record[name]


def label_report(name: str, changed: Mapping[str, int], dropped: Mapping[str, int], unit: str) -> list[str]:
    """The report lines of the label rules on one file (``name``): the labels changed and those dropped,
    with counts (``unit``: what is dropped, and why: "examples of data.drop_labels")."""
    lines = []
    if changed:
        listed = ", ".join(f"{change} ({count})" for change, count in sorted(changed.items()))
        lines.append(f"{name}: label rules changed {sum(changed.values())} label(s): {listed}")
    if dropped:
        listed = ", ".join(f"{label} ({count})" for label, count in sorted(dropped.items()))
        lines.append(f"{name}: dropped {sum(dropped.values())} {unit}: {listed}")
    return lines


def unknown_labels_message(unknown: Sequence[str], seen: Sequence[str], order: Sequence[str] | None) -> str:
    """The error for labels outside the fixed order ``data.labels``, with how often each occurs."""
    counts = {label: sum(1 for s in seen if s == label) for label in unknown}
    listed = ", ".join(f"{label!r} ({counts[label]}x)" for label in unknown[:10])
    return (
        f"unknown label(s) {listed}: not in data.labels ({', '.join(order or ())}); add them to data.labels, "
        "rename them with data.label_map or drop them with data.drop_labels"
    )
