"""Score predictions against gold labels with the libraries of the field: seqeval and scikit-learn.

``token_classification_metrics`` takes word-level IOB tag sequences and scores whole entities in
seqeval's default mode, the one compatible with the CoNLL ``conlleval`` script (an ``I-`` tag after
``O`` or another type starts a new entity). ``text_classification_metrics`` takes label strings.
Both return plain Python floats. ``TOKEN_METRICS`` and ``TEXT_METRICS`` name the metrics a study
may optimise for each task (the loss is handled by the training recipe).
"""

from __future__ import annotations

__all__ = [
    "TEXT_METRICS",
    "TOKEN_METRICS",
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


def _check_sequences(gold: list[list[str]], pred: list[list[str]]) -> None:
    """Gold and pred must hold the same number of sentences, each with the same number of tags."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    if not gold:
        raise ValueError("cannot score an empty list of sentences")
    for index, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {index}: gold has {len(gold_tags)} tags but pred has {len(pred_tags)}")
