"""Score predictions against gold labels with the libraries of the field: seqeval and scikit-learn.

``token_classification_metrics`` takes word-level IOB tag sequences and scores whole entities in
seqeval's default mode, the one compatible with the CoNLL ``conlleval`` script (an ``I-`` tag after
``O`` or another type starts a new entity). ``text_classification_metrics`` takes label strings.
``generation_metrics`` scores generated answers against reference answers (exact match and token F1
as SQuAD's evaluation computes them, ROUGE-L from Google's ``rouge-score``, accuracy over a label set).
All return plain Python floats. ``TOKEN_METRICS``, ``TEXT_METRICS`` and ``GENERATION_METRICS`` name the
metrics a study may optimise for each task (the loss is handled by the training recipe).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "GENERATION_METRICS",
    "TEXT_METRICS",
    "TOKEN_METRICS",
    "generated_label",
    "generation_metrics",
    "normalize_answer",
    "text_classification_metrics",
    "token_classification_metrics",
]

TOKEN_METRICS: tuple[str, ...] = ("f1", "precision", "recall", "accuracy")
TEXT_METRICS: tuple[str, ...] = (
    "accuracy",
    "macro_f1",
    "micro_f1",
    "weighted_f1",
    "macro_precision",
    "macro_recall",
)


def token_classification_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1, word-level accuracy, and F1 per entity type.

    Keys: ``precision``, ``recall``, ``f1``, ``accuracy`` and ``f1_<TYPE>`` for every entity type
    found in gold or pred. A predicted entity counts only when its type and both boundaries match;
    a score with nothing to divide by is 0.
    """
    from seqeval.metrics import accuracy_score
    from seqeval.metrics.sequence_labeling import get_entities, precision_recall_fscore_support

    _check_sequences(gold, pred)
    precision, recall, f1, _ = precision_recall_fscore_support(gold, pred, average="micro", zero_division=0)
    types = sorted({name for name, _, _ in get_entities(gold) + get_entities(pred)})
    scores = {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "accuracy": float(accuracy_score(gold, pred)),
    }
    if types:
        _, _, per_type, _ = precision_recall_fscore_support(gold, pred, average=None, zero_division=0)
        scores.update({f"f1_{name}": float(value) for name, value in zip(types, per_type, strict=True)})
    return scores


def text_classification_metrics(gold: list[str], pred: list[str]) -> dict[str, float]:
    """Accuracy, micro/macro/weighted F1 and macro precision/recall over label strings.

    Macro averages weigh every label seen in gold or pred equally; a score with nothing to divide
    by is 0.
    """
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} labels but pred has {len(pred)}")
    if not gold:
        raise ValueError("cannot score an empty list of labels")
    gold, pred = [str(label) for label in gold], [str(label) for label in pred]
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
        "weighted_f1": float(f1_score(gold, pred, average="weighted", zero_division=0)),
        "macro_precision": float(precision_score(gold, pred, average="macro", zero_division=0)),
        "macro_recall": float(recall_score(gold, pred, average="macro", zero_division=0)),
    }


GENERATION_METRICS: tuple[str, ...] = ("exact_match", "token_f1", "rouge_l", "label_accuracy")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles (a, an, the), single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def _token_f1(reference: str, prediction: str) -> float:
    """F1 of the normalized tokens shared by the two (SQuAD's): 1 when both are empty, 0 when one is."""
    ref, pred = normalize_answer(reference).split(), normalize_answer(prediction).split()
    if not ref or not pred:
        return float(ref == pred)
    common = sum((Counter(ref) & Counter(pred)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _label_words(labels: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Each label with its normalized words, the longest first (the order answers are read in)."""
    return sorted(((label, normalize_answer(label).split()) for label in labels), key=lambda lw: -len(lw[1]))


def _read_label(answer: str, label_words: list[tuple[str, list[str]]]) -> str | None:
    words = normalize_answer(answer).split()
    return next((label for label, own in label_words if own and words[: len(own)] == own), None)


def generated_label(prediction: str, labels: Sequence[str]) -> str | None:
    """The label a generated answer names: the one (longest first) its normalized text starts with, word for
    word ("Positive." and "positive sentiment" name "positive"); None when it starts with none."""
    return _read_label(prediction, _label_words(labels))


def generation_metrics(
    references: Sequence[str], predictions: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, float]:
    """Means over the examples: ``exact_match`` and ``token_f1`` of the normalized answers (SQuAD's),
    ``rouge_l`` (ROUGE-L F-measure, ``rouge-score`` without stemming) and, with a label set (generative
    classification), ``label_accuracy``: the share of answers whose ``generated_label`` is the reference's."""
    from rouge_score import rouge_scorer

    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("cannot score an empty list of answers")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = list(zip(references, predictions, strict=True))
    scores = {
        "exact_match": sum(normalize_answer(r) == normalize_answer(p) for r, p in pairs) / len(pairs),
        "token_f1": sum(_token_f1(r, p) for r, p in pairs) / len(pairs),
        "rouge_l": sum(scorer.score(r, p)["rougeL"].fmeasure for r, p in pairs) / len(pairs),
    }
    if labels is not None:
        read = _label_words(labels)  # once for every answer
        gold = [_read_label(r, read) for r in references]
        hits = sum(g is not None and _read_label(p, read) == g for g, p in zip(gold, predictions, strict=True))
        scores["label_accuracy"] = hits / len(pairs)
    return {name: float(value) for name, value in scores.items()}


def _check_sequences(gold: list[list[str]], pred: list[list[str]]) -> None:
    """Gold and pred must hold the same number of sentences, each with the same number of tags."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    if not gold:
        raise ValueError("cannot score an empty list of sentences")
    for index, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {index}: gold has {len(gold_tags)} tags but pred has {len(pred_tags)}")
