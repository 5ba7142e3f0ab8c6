"""Text classification: one label per text, scored with scikit-learn (accuracy, F1, precision, recall).

Reads CSV, TSV or JSON Lines (``data.text_column`` and ``data.label_column``); an example is a text.
A dev or test split carved from train is stratified by label when it can be; features are the
tokenized texts with one label id each; the model is ``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmflow_hpo.errors import ConfigError, DataError
from llmflow_hpo.tasks.base import (
    BaseTask,
    Cleaner,
    ScoredFeatures,
    clean_text,
    json_field,
    label_report,
    unknown_labels_message,
)
from llmflow_hpo.tasks.metrics import TEXT_METRICS, text_classification_metrics

__all__ = ["TextClassification", "TextExample"]


@dataclass(frozen=True)
class TextExample:
    """One text for classification; the label is always a string ("0", "1", "positive")."""

    text: str
    label: str

    def cleaned(self, clean: Cleaner, source: str, number: int) -> TextExample | None:
        """Called by ``data.clean.clean_examples``: text and label cleaned; None when the text becomes empty,
        or when a text is left without a label."""
        text, label = clean(self.text), clean(self.label)
        if text and not label:
            clean.count("no_label")
            return None
        if not text:
            clean.count("empty")
            return None
        return TextExample(text, label)


class TextClassification(BaseTask):
    """Sequence classification: one label per text."""

    name = "text-classification"
    formats = ("csv", "tsv", "jsonl", "lines", "json", "parquet", "arrow", "hf-disk")
    unit = "example"
    label_field = "data.label_column"
    stratify = True
    metrics = (*TEXT_METRICS, "loss")
    default_metric = "accuracy"
    model_card_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"

    def check_config(self, cfg: Any) -> list[tuple[str, str]]:
        problems = super().check_config(cfg)
        if cfg.data.tag_scheme != "IOB2":
            problems.append(("data.tag_scheme", "applies to token-classification only; remove it"))
        return problems

    def format_problem(self, format: str) -> str:
        return f"text-classification reads {', '.join(self.formats)}"

    # ------------------------------------------------------------------ reading

    def check_record_fields(self, fields: Mapping[str, object]) -> None:
        """Records: the text and label columns are field names."""
        for key, name in (("text", "text_column"), ("label", "label_column")):
            value = fields[key]
            if not isinstance(value, str):
                raise ConfigError(f"data.{name}: records (jsonl, json, tables) are read by field name, not {value!r}")

    def record_example(self, path: str | Path, where: str, record: dict, fields: Mapping[str, str]) -> TextExample:
        text_field, label_field = fields["text"], fields["label"]
        text = json_field(path, where, record, text_field)
        label = json_field(path, where, record, label_field)
        if not isinstance(text, str):
            raise DataError(path, f"{where}: field {text_field!r} must be a string")
        if isinstance(label, bool):
            label = str(label).lower()
        if not isinstance(label, (str, int, float)):
            raise DataError(path, f"{where}: field {label_field!r} must be a string or number")
        return TextExample(text=text, label=str(label))

    def example_labels(self, example: TextExample) -> Sequence[str]:
        return (example.label,)

    def label_set(self, examples: list, order: Sequence[str] | None = None) -> list[str]:
        """The labels of ``order`` as given, else the labels seen, sorted as strings."""
        return list(order) if order else sorted({example.label for example in examples})

    def relabel(self, examples: list, rules: Any, data: Any, source: str) -> tuple[list, list[str]]:
        """Each label through the rules; an example whose label is dropped goes, and is counted."""
        if not rules.changes and rules.order is None:
            return examples, []
        kept, changed, dropped = [], Counter(), Counter()
        for number, example in enumerate(examples, start=1):
            try:
                label = rules.apply(example.label)
            except ValueError as error:
                raise DataError(source, f"example {number}: {error}") from None
            if label is None:
                dropped[example.label] += 1
                continue
            if label != example.label:
                changed[f"{example.label} -> {label}"] += 1
            kept.append(TextExample(example.text, label))
        unknown = rules.unknown([example.label for example in kept])
        if unknown:
            raise DataError(source, unknown_labels_message(unknown, [e.label for e in kept], rules.order))
        return kept, label_report(Path(source).name, changed, dropped, "examples of data.drop_labels")

    def input_key(self, example: TextExample) -> str:
        return example.text

    def summary(self, splits: Any) -> list[str]:
        lines = []
        for name in ("train", "dev", "test"):
            counts = Counter(example.label for example in getattr(splits, name))
            lines.append(f"{name} label counts: " + ", ".join(f"{k}={counts[k]}" for k in sorted(counts)))
        return lines

    # ------------------------------------------------------------------ features

    def tokenize(
        self, examples: list[TextExample], tokenizer: Any, label_ids: Mapping[str, int], data: Any
    ) -> tuple[dict[str, list], list[str]]:
        """Input ids of each text (truncated to ``data.max_length``) and its label id."""
        max_length = data.max_length
        enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
        columns: dict[str, list] = {key: list(value) for key, value in enc.items()}
        columns["labels"] = [label_ids[e.label] for e in examples]
        truncated = sum(
            1
            for e, ids in zip(examples, columns["input_ids"], strict=True)
            if _was_cut(tokenizer, e.text, ids, max_length)
        )
        report = [f"{truncated} of {len(examples)} examples truncated to data.max_length={max_length} subword tokens"]
        return columns, report if truncated else []

    # ------------------------------------------------------------------ model and predictions

    def model_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def collator(self, tokenizer: Any, data: Any) -> Any:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def batch_predictions(self, logits: Any, labels: Any) -> list[int]:
        """The predicted label id of each example (the argmax of its logits)."""
        return logits.argmax(-1).cpu().tolist()

    def score(self, features: ScoredFeatures, split: str, predictions: list) -> dict[str, float]:
        """scikit-learn metrics of the predicted label names against the split's gold labels."""
        names = features.labels
        return text_classification_metrics(features.gold_labels(split), [names[i] for i in predictions])

    # ------------------------------------------------------------------ deployment

    def parse_input(self, value: Any, data: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a text, got {type(value).__name__}")
        text = clean_text(value, data)
        if not text:
            raise ValueError("the text is empty")
        return text

    def example_input(self, example: TextExample, data: Any) -> str:
        return example.text

    def encode_inputs(self, inputs: list[str], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        enc = tokenizer(list(inputs), truncation=True, max_length=max_length)
        return [{"input_ids": ids, "text": text} for ids, text in zip(enc["input_ids"], inputs, strict=True)]

    def decode(self, logits: Any, encoded: dict[str, Any], labels: list[str]) -> dict[str, Any]:
        """The label, its probability, and every class's probability (softmax of the logits)."""
        import numpy as np

        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        return {
            "text": encoded["text"],
            "label": labels[best],
            "score": round(float(probs[best]), 6),
            "probabilities": {label: round(float(p), 6) for label, p in zip(labels, probs, strict=True)},
        }

    def gold(self, example: TextExample, data: Any) -> str:
        return example.label

    def prediction_metrics(self, gold: list, predictions: list[dict[str, Any]], cfg: Any) -> dict[str, float]:
        return text_classification_metrics(gold, [p["label"] for p in predictions])


def _was_cut(tokenizer: Any, text: str, ids: list[int], max_length: int) -> bool:
    """Whether truncation dropped tokens: an example of exactly max_length tokens was not cut."""
    if len(ids) < max_length:
        return False
    return len(tokenizer(text, truncation=False)["input_ids"]) > max_length
