"""Token classification (named-entity recognition): IOB tags per word, scored by whole entities (seqeval).

Reads CoNLL column files or JSON Lines (``tokens`` and ``tags`` fields); an example is a sentence.
Features label the first subword of each word (a fast tokenizer gives the word of each token); the
model is ``AutoModelForTokenClassification``; dev and test are scored on word-level tags, every word
counted, a word cut off by ``data.max_length`` predicted O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmflow_hpo.errors import ConfigError, DataError
from llmflow_hpo.tasks.base import IGNORE_INDEX, BaseTask, Cleaner, ScoredFeatures, json_field
from llmflow_hpo.tasks.metrics import TOKEN_METRICS, token_classification_metrics

__all__ = ["TokenClassification", "TokenExample", "align_labels", "word_predictions"]


@dataclass(frozen=True)
class TokenExample:
    """One sentence for named-entity recognition: words and their IOB tags, one tag per word."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]

    def cleaned(self, clean: Cleaner, source: str, number: int) -> TokenExample | None:
        """Called by ``data.read.clean_examples``: words and tags cleaned; a word that becomes empty is
        dropped with its tag; a word left without a tag is an error; None when no word is left."""
        if len(self.tokens) != len(self.tags):
            raise DataError(source, f"example {number}: {len(self.tokens)} tokens but {len(self.tags)} tags")
        tokens: list[str] = []
        tags: list[str] = []
        for raw_token, raw_tag in zip(self.tokens, self.tags, strict=True):
            token, tag = clean(raw_token), clean(raw_tag)
            if not token:
                clean.count("empty_tokens")
                continue
            if not tag:
                raise DataError(source, f"example {number}: word {token!r} has an empty tag")
            tokens.append(token)
            tags.append(tag)
        if not tokens:
            clean.count("empty")
            return None
        return TokenExample(tuple(tokens), tuple(tags))


class TokenClassification(BaseTask):
    """Named-entity recognition: one IOB tag per word."""

    name = "token-classification"
    formats = ("conll", "jsonl")
    unit = "sentence"
    label_field = "data.tag_column"
    stratify = False
    metrics = (*TOKEN_METRICS, "loss")
    default_metric = "f1"
    model_card_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    # Word-level gold tags, and the word of each labelled position: read by score, not model inputs.
    scoring_columns = ("word_labels", "label_words")

    def format_problem(self, format: str) -> str:
        return f"{format} holds no token tags; use conll or jsonl"

    # ------------------------------------------------------------------ reading

    def jsonl_example(self, path: str | Path, number: int, record: dict, fields: Mapping[str, str]) -> TokenExample:
        tokens_field, tags_field = fields["tokens"], fields["tags"]
        tokens = json_field(path, number, record, tokens_field)
        tags = json_field(path, number, record, tags_field)
        for name, value in ((tokens_field, tokens), (tags_field, tags)):
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise DataError(path, f"line {number}: field {name!r} must be a list of strings")
        if len(tokens) != len(tags):
            raise DataError(path, f"line {number}: {len(tokens)} tokens but {len(tags)} tags")
        return TokenExample(tuple(tokens), tuple(tags))

    def example_labels(self, example: TokenExample) -> Sequence[str]:
        return example.tags

    def label_set(self, examples: list) -> list[str]:
        """Every tag seen, "O" first (when there is one), then the others sorted."""
        tags = {tag for example in examples for tag in example.tags}
        return (["O"] if "O" in tags else []) + sorted(tags - {"O"})

    def train_problem(self, counts: Mapping[str, int]) -> str | None:
        if set(counts) - {"O"}:
            return None
        return (
            f"the train split has no entities (all {sum(counts.values())} tags are O): a model learns nothing from it; "
            "check data.tag_column (or the tags field) and that the file holds IOB tags such as B-PER"
        )

    def summary(self, splits: Any) -> list[str]:
        lines = []
        for name in ("dev", "test"):
            if not {tag for example in getattr(splits, name) for tag in example.tags} - {"O"}:
                lines.append(
                    f"warning: {name} has no entities (every tag is O): its entity f1, precision and recall are 0"
                )
        return lines

    # ------------------------------------------------------------------ features

    def check_tokenizer(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                "model.name_or_path: token-classification needs a fast tokenizer (word_ids for label alignment); "
                f"{type(tokenizer).__name__} is not one"
            )

    def tokenize(
        self, examples: list[TokenExample], tokenizer: Any, label_ids: Mapping[str, int], data: Any
    ) -> tuple[dict[str, list], list[str]]:
        """Input ids, the first-subword labels, the word-level gold labels and, for every labelled position, the
        index of its word (``label_words``): evaluation maps predictions back to words through it.

        A word the tokenizer gives no subword (a zero-width or control character that survived cleaning) has
        no position: it is counted and reported, and scored as predicted O, never shifted onto the next word.
        """
        max_length = data.max_length
        enc = tokenizer(
            [list(e.tokens) for e in examples],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
        )
        columns: dict[str, list] = {key: list(value) for key, value in enc.items()}
        columns.update({name: [] for name in ("labels", *self.scoring_columns)})
        truncated = 0
        empty: list[str] = []  # words with no subword token
        for i, example in enumerate(examples):
            word_labels = [label_ids[t] for t in example.tags]
            word_ids = enc.word_ids(i)
            aligned = align_labels(word_ids, word_labels)
            label_words = [w for w, a in zip(word_ids, aligned, strict=True) if a != IGNORE_INDEX]
            present = set(label_words)
            last = max(present, default=-1)
            cut = len(columns["input_ids"][i]) >= max_length and last < len(word_labels) - 1
            truncated += cut
            tail = last + 1 if cut else len(word_labels)  # words after the cut are truncated, not empty
            empty.extend(example.tokens[w] for w in range(tail) if w not in present)
            columns["labels"].append(aligned)
            columns["word_labels"].append(word_labels)
            columns["label_words"].append(label_words)
        return columns, _tokenize_report(len(examples), truncated, empty, max_length)

    # ------------------------------------------------------------------ model and predictions

    def model_class(self) -> Any:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def collator(self, tokenizer: Any, data: Any) -> Any:
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)

    def batch_predictions(self, logits: Any, labels: Any) -> list[list[int]]:
        """Per example, the predicted label ids at its labelled positions (label != IGNORE_INDEX), in order."""
        predicted = logits.argmax(-1)
        return [
            [p for p, g in zip(row_pred, row_labels, strict=True) if g != IGNORE_INDEX]
            for row_pred, row_labels in zip(predicted.cpu().tolist(), labels.cpu().tolist(), strict=True)
        ]

    def score(self, features: ScoredFeatures, split: str, predictions: list) -> dict[str, float]:
        """Entity-level seqeval metrics of the word-level tags (``word_predictions``) against the gold tags."""
        gold = features.gold_tags(split)
        pred = word_predictions(predictions, features.splits[split]["label_words"], gold, features.labels)
        return token_classification_metrics(gold, pred)


def _tokenize_report(total: int, truncated: int, empty: list[str], max_length: int) -> list[str]:
    report = []
    if truncated:
        report.append(
            f"{truncated} of {total} examples truncated to data.max_length={max_length} subword tokens "
            "(their cut-off words are scored as O)"
        )
    if empty:
        shown = ", ".join(sorted({ascii(w) for w in empty})[:5])
        report.append(
            f"{len(empty)} words have no subword token in this tokenizer (e.g. {shown}); they are predicted O"
        )
    return report


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Label the first subword of each word; later subwords and special tokens get IGNORE_INDEX."""
    aligned: list[int] = []
    previous: int | None = None
    for word_id in word_ids:
        if word_id is None or word_id == previous:
            aligned.append(IGNORE_INDEX)
        else:
            aligned.append(word_labels[word_id])
        previous = word_id
    return aligned


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
