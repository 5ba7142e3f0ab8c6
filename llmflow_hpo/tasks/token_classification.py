"""Token classification (named-entity recognition): IOB tags per word, scored by whole entities (seqeval).

Reads CoNLL column files or JSON Lines (``tokens`` and ``tags`` fields); an example is a sentence.
Features label the first subword of each word (a fast tokenizer gives the word of each token); the
model is ``AutoModelForTokenClassification``; dev and test are scored on word-level tags, every word
counted, a word cut off by ``data.max_length`` predicted O.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmflow_hpo.errors import ConfigError, DataError
from llmflow_hpo.tasks.base import (
    IGNORE_INDEX,
    BaseTask,
    Cleaner,
    ScoredFeatures,
    clean_text,
    json_field,
    label_report,
    unknown_labels_message,
)
from llmflow_hpo.tasks.metrics import TOKEN_METRICS, token_classification_metrics
from llmflow_hpo.tasks.tag_schemes import split_tag, to_iob2

__all__ = ["TokenClassification", "TokenExample", "WordsInput", "align_labels", "split_words", "word_predictions"]

# A text's words for NER as CoNLL has them: runs of word characters (with inner hyphens, apostrophes and dots:
# "Jean-Pierre", "O'Neil", "U.S"), every other non-space character a word of its own.
_WORD = re.compile(r"\w+(?:[-'\u2019.]\w+)*|\S")


@dataclass(frozen=True)
class TokenExample:
    """One sentence for named-entity recognition: words and their IOB tags, one tag per word."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]

    def cleaned(self, clean: Cleaner, source: str, number: int) -> TokenExample | None:
        """Called by ``data.clean.clean_examples``: words and tags cleaned; a word that becomes empty is
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


@dataclass(frozen=True)
class WordsInput:
    """One sentence to tag: its text, its words and each word's (start, end) character offsets in the text."""

    text: str
    words: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def of_words(cls, words: Sequence[str]) -> WordsInput:
        """Words as given (a CoNLL sentence, a request's list): the text is the words joined by spaces."""
        spans, start = [], 0
        for word in words:
            spans.append((start, start + len(word)))
            start += len(word) + 1
        return cls(" ".join(words), tuple(words), tuple(spans))


def split_words(text: str, data: Any) -> WordsInput:
    """A text's words (``_WORD``), each cleaned as training words are, with offsets into the text as given."""
    matches = list(_WORD.finditer(text))
    words = tuple(clean_text(m.group(), data) for m in matches)
    return WordsInput(text, words, tuple(m.span() for m in matches))


class TokenClassification(BaseTask):
    """Named-entity recognition: one IOB tag per word."""

    name = "token-classification"
    formats = ("conll", "jsonl", "json", "parquet", "arrow", "hf-disk")
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
        return f"{format} holds no token tags; use one of {', '.join(self.formats)}"

    # ------------------------------------------------------------------ reading

    def record_example(self, path: str | Path, where: str, record: dict, fields: Mapping[str, str]) -> TokenExample:
        tokens_field, tags_field = fields["tokens"], fields["tags"]
        tokens = json_field(path, where, record, tokens_field)
        tags = json_field(path, where, record, tags_field)
        for name, value in ((tokens_field, tokens), (tags_field, tags)):
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise DataError(path, f"{where}: field {name!r} must be a list of strings")
        if len(tokens) != len(tags):
            raise DataError(path, f"{where}: {len(tokens)} tokens but {len(tags)} tags")
        return TokenExample(tuple(tokens), tuple(tags))

    def example_labels(self, example: TokenExample) -> Sequence[str]:
        return example.tags

    def label_set(self, examples: list, order: Sequence[str] | None = None) -> list[str]:
        """With ``order`` (entity types): O, then B- and I- of each type in that order. Else every tag seen, "O"
        first (when there is one), then the others sorted."""
        if order:
            return ["O", *(f"{prefix}-{kind}" for kind in order for prefix in ("B", "I"))]
        tags = {tag for example in examples for tag in example.tags}
        return (["O"] if "O" in tags else []) + sorted(tags - {"O"})

    def relabel(self, examples: list, rules: Any, data: Any, source: str) -> tuple[list, list[str]]:
        """Tags of ``data.tag_scheme`` converted to IOB2 (faults counted), then the rules applied to each
        entity type: a type mapped to O or dropped leaves its words O."""
        name = Path(source).name
        converted, faults = [], []
        for number, example in enumerate(examples, start=1):
            try:
                tags, found = to_iob2(example.tags, data.tag_scheme)
            except ValueError as error:
                raise DataError(source, f"sentence {number}: {error}") from None
            faults.extend((number, fault) for fault in found)
            converted.append(TokenExample(example.tokens, tags))
        lines = [f"{name}: tags converted from {data.tag_scheme} to IOB2"] if data.tag_scheme != "IOB2" else []
        if faults:
            shown = "; ".join(f"sentence {n} word {f.word + 1}: {f.problem}" for n, f in faults[:3])
            lines.append(
                f"{name}: {len(faults)} tag sequence(s) that {data.tag_scheme} does not allow, read as conlleval "
                f"reads them (an entity starts there): {shown}"
            )
        if rules.changes or rules.order is not None:
            converted, more = _relabel_types(converted, rules, source)
            lines.extend(more)
        return converted, lines

    def input_key(self, example: TokenExample) -> tuple[str, ...]:
        return example.tokens

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

    # ------------------------------------------------------------------ deployment

    def parse_input(self, value: Any, data: Any) -> WordsInput:
        """A text (split into words by ``split_words``) or a list of words."""
        if isinstance(value, str):
            sentence = split_words(value, data)
        elif isinstance(value, list) and all(isinstance(word, str) for word in value):
            words = [clean_text(word, data) for word in value]
            if any(not word or " " in word for word in words):
                raise ValueError("every word must be a non-empty string without spaces")
            sentence = WordsInput.of_words(words)
        else:
            raise ValueError(f"expected a text or a list of words, got {type(value).__name__}")
        if not sentence.words:
            raise ValueError("the text has no words")
        return sentence

    def example_input(self, example: TokenExample, data: Any) -> WordsInput:
        return WordsInput.of_words(example.tokens)

    def encode_inputs(self, inputs: list[WordsInput], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        """Input ids as training tokenizes them, and each word's first subword position (None: cut off)."""
        enc = tokenizer(
            [list(i.words) for i in inputs], is_split_into_words=True, truncation=True, max_length=max_length
        )
        encoded = []
        for row, sentence in enumerate(inputs):
            first: list[int | None] = [None] * len(sentence.words)
            for position, word in enumerate(enc.word_ids(row)):
                if word is not None and first[word] is None:
                    first[word] = position
            encoded.append({"input_ids": enc["input_ids"][row], "first": first, "input": sentence})
        return encoded

    def decode(self, logits: Any, encoded: dict[str, Any], labels: list[str]) -> dict[str, Any]:
        """The word-level tags (a word cut off by max_length is O, as in scoring) and the entities as spans:
        type, text, words [start, end), characters [start, end) and score (the mean probability of its tags)."""
        import numpy as np
        from seqeval.metrics.sequence_labeling import get_entities

        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        sentence: WordsInput = encoded["input"]
        tags, scores = [], []
        for position in encoded["first"]:
            best = 0 if position is None else int(probs[position].argmax())
            tags.append("O" if position is None else labels[best])
            scores.append(None if position is None else float(probs[position, best]))
        entities = []
        for kind, start, last in get_entities(tags):
            begin, end = sentence.spans[start][0], sentence.spans[last][1]
            word_scores = [s for s in scores[start : last + 1] if s is not None]
            entities.append(
                {
                    "type": kind,
                    "text": sentence.text[begin:end],
                    "start_word": start,
                    "end_word": last + 1,
                    "start_char": begin,
                    "end_char": end,
                    "score": round(sum(word_scores) / len(word_scores), 6),
                }
            )
        return {"text": sentence.text, "words": list(sentence.words), "tags": tags, "entities": entities}

    def gold(self, example: TokenExample, data: Any) -> list[str]:
        return list(example.tags)

    def prediction_metrics(self, gold: list, predictions: list[dict[str, Any]], cfg: Any) -> dict[str, float]:
        return token_classification_metrics(gold, [p["tags"] for p in predictions])


def _relabel_types(examples: list[TokenExample], rules: Any, source: str) -> tuple[list[TokenExample], list[str]]:
    """The label rules on each tag's entity type; the tags of a type that becomes O (or is dropped) become O."""
    changed: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    out = []
    for number, example in enumerate(examples, start=1):
        tags = []
        for tag in example.tags:
            prefix, kind = split_tag(tag)
            if prefix == "O":
                tags.append(tag)
                continue
            try:
                new = rules.apply(kind)
            except ValueError as error:
                raise DataError(source, f"sentence {number}: {error}") from None
            if new is None or new == "O":
                dropped[kind] += prefix == "B"  # entities, counted at their first word
                tags.append("O")
                continue
            if new != kind and prefix == "B":
                changed[f"{kind} -> {new}"] += 1
            tags.append(f"{prefix}-{new}")
        out.append(TokenExample(example.tokens, tuple(tags)))
    kinds = [split_tag(tag)[1] for example in out for tag in example.tags if tag != "O"]
    unknown = rules.unknown(kinds)
    if unknown:
        raise DataError(source, unknown_labels_message(unknown, kinds, rules.order))
    return out, label_report(Path(source).name, changed, dropped, "entities of data.drop_labels or mapped to O")


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
