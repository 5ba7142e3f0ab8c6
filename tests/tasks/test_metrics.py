"""Metrics against hand-computed values: entity-level seqeval scores and scikit-learn averages."""

from __future__ import annotations

import pytest

from llmflow_hpo.tasks.metrics import (
    TEXT_METRICS,
    TOKEN_METRICS,
    text_classification_metrics,
    token_classification_metrics,
)


def test_one_wrong_entity_type_halves_every_score() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"]]

    scores = token_classification_metrics(gold, pred)

    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(0.5)
    assert scores["accuracy"] == pytest.approx(0.75)
    # per type: every type seen in gold or pred, the pred-only ORG included
    assert scores["f1_PER"] == pytest.approx(1.0)
    assert scores["f1_LOC"] == pytest.approx(0.0)
    assert scores["f1_ORG"] == pytest.approx(0.0)
    assert set(scores) == {"precision", "recall", "f1", "accuracy", "f1_PER", "f1_LOC", "f1_ORG"}


def test_partial_span_counts_as_wrong() -> None:
    gold = [["B-ORG", "I-ORG", "I-ORG", "O"]]
    pred = [["B-ORG", "I-ORG", "O", "O"]]

    scores = token_classification_metrics(gold, pred)

    assert scores["precision"] == 0.0
    assert scores["recall"] == 0.0
    assert scores["f1"] == 0.0
    assert scores["accuracy"] == pytest.approx(0.75)  # word level: 3 of 4 tags right


def test_i_tag_without_b_starts_an_entity_as_in_conlleval() -> None:
    gold = [["B-PER", "I-PER", "O"]]
    pred = [["I-PER", "I-PER", "O"]]  # no B-, but the span and type are right

    scores = token_classification_metrics(gold, pred)

    assert scores["f1"] == pytest.approx(1.0)
    assert scores["accuracy"] == pytest.approx(2 / 3)


def test_i_tag_of_another_type_splits_the_entity() -> None:
    gold = [["B-LOC", "I-LOC"]]
    pred = [["B-LOC", "I-ORG"]]  # conlleval: LOC(0) then a new ORG(1)

    scores = token_classification_metrics(gold, pred)

    assert scores["precision"] == 0.0
    assert scores["recall"] == 0.0
    assert scores["f1_ORG"] == 0.0


def test_micro_scores_over_several_sentences() -> None:
    gold = [["B-PER", "O", "B-LOC", "I-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "B-LOC", "O"], ["B-ORG", "B-MISC"]]
    # gold entities: PER, LOC(2-3), ORG; pred: PER, LOC(2), ORG, MISC; correct: PER, ORG

    scores = token_classification_metrics(gold, pred)

    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(4 / 7)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert (scores["f1_PER"], scores["f1_ORG"], scores["f1_LOC"], scores["f1_MISC"]) == (1.0, 1.0, 0.0, 0.0)


def test_no_entities_anywhere_scores_zero_without_error() -> None:
    scores = token_classification_metrics([["O", "O"]], [["O", "O"]])

    assert scores == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 1.0}


def test_token_scores_are_plain_floats() -> None:
    scores = token_classification_metrics([["B-PER"]], [["B-PER"]])

    assert all(type(value) is float for value in scores.values())


@pytest.mark.parametrize(
    ("gold", "pred"),
    [
        ([["O"], ["O"]], [["O"]]),  # sentence count
        ([["O", "B-PER"]], [["O"]]),  # words in one sentence
        ([], []),  # nothing to score
    ],
)
def test_token_lengths_must_match(gold: list[list[str]], pred: list[list[str]]) -> None:
    with pytest.raises(ValueError):
        token_classification_metrics(gold, pred)


def test_three_class_scores_by_hand() -> None:
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    # a: tp 2, fp 0, fn 1 -> P 1, R 2/3, F1 0.8
    # b: tp 1, fp 1, fn 1 -> P 1/2, R 1/2, F1 1/2
    # c: tp 1, fp 1, fn 0 -> P 1/2, R 1, F1 2/3

    scores = text_classification_metrics(gold, pred)

    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["micro_f1"] == pytest.approx(4 / 6)
    assert scores["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert scores["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert scores["macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert scores["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert set(scores) == set(TEXT_METRICS)
    assert all(type(value) is float for value in scores.values())


def test_class_never_predicted_scores_zero_without_error() -> None:
    scores = text_classification_metrics(["0", "1"], ["0", "0"])
    # "0": P 1/2, R 1, F1 2/3; "1": never predicted -> P 0, R 0, F1 0

    assert scores["macro_precision"] == pytest.approx(0.25)
    assert scores["macro_f1"] == pytest.approx(1 / 3)


def test_text_lengths_must_match() -> None:
    with pytest.raises(ValueError):
        text_classification_metrics(["0", "1"], ["0"])
    with pytest.raises(ValueError):
        text_classification_metrics([], [])


def test_metric_names_per_task() -> None:
    assert set(TOKEN_METRICS) <= set(token_classification_metrics([["B-PER"]], [["B-PER"]]))
    assert TOKEN_METRICS[0] == "f1"
    assert TEXT_METRICS[0] == "accuracy"
