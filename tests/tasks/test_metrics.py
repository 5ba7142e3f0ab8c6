"""Metrics against hand-computed values: entity-level seqeval scores, scikit-learn averages, generation scores."""

from __future__ import annotations

import pytest

from llmflow_hpo.tasks.metrics import (
    GENERATION_METRICS,
    TEXT_METRICS,
    TOKEN_METRICS,
    generated_label,
    generation_metrics,
    normalize_answer,
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


# ----------------------------------------------------------------------------------------------------
# Generated answers.


def test_answers_are_normalized_as_squad_does() -> None:
    assert normalize_answer("  The  Eiffel-Tower, in Paris! ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"


def test_generation_scores_against_hand_computed_values() -> None:
    refs = ["the cat sat on the mat", "Paris", "blue whale"]
    preds = ["The cat on the mat.", "paris", "a whale shark"]
    scores = generation_metrics(refs, preds)
    assert set(scores) == {"exact_match", "token_f1", "rouge_l"}
    # exact match: only "paris" (case and punctuation do not count)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    # token F1 on normalized tokens: cat sat on mat / cat on mat -> P 3/3, R 3/4, F1 6/7; 1; whale: P 1/2, R 1/2
    assert scores["token_f1"] == pytest.approx((6 / 7 + 1 + 0.5) / 3)
    # ROUGE-L on rouge-score's tokens (lower case, articles kept): LCS 5 of 6 / 5 -> F 10/11; 1; LCS 1 of 2 / 3 -> 0.4
    assert scores["rouge_l"] == pytest.approx((10 / 11 + 1 + 0.4) / 3)


def test_empty_answers_and_mismatched_lengths() -> None:
    assert generation_metrics([""], [""])["token_f1"] == 1.0  # nothing to find and nothing said
    assert generation_metrics(["yes"], [""]) == {"exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0}
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        generation_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        generation_metrics([], [])


def test_generative_classification_reads_the_label_an_answer_starts_with() -> None:
    labels = ["positive", "negative", "very negative"]
    assert generated_label("Positive.", labels) == "positive"
    assert generated_label("negative sentiment, clearly", labels) == "negative"
    assert generated_label("Very negative!", labels) == "very negative"  # the longest label first
    assert generated_label("It is positive", labels) is None  # an answer must start with its label
    refs = ["positive", "negative", "negative", "positive"]
    preds = ["Positive!", "negative", "positive", "I think so"]
    scores = generation_metrics(refs, preds, labels=labels)
    assert scores["label_accuracy"] == 0.5  # right, right, wrong, no label
    assert set(scores) == set(GENERATION_METRICS)
