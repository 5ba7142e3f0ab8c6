"""predict: a model folder's predictions for files in the training formats, unlabelled files and stdin; with
--evaluate, the training metrics of the same examples (equal to what retrain-best reported)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmflow_hpo.cli import main
from llmflow_hpo.deliver.model_folder import ModelFolder
from llmflow_hpo.deliver.predict import Predictor, read_inputs


def _test_metrics(model: Path) -> dict[str, float]:
    return json.loads((model / "metrics.json").read_text())["test"]


def test_predict_evaluate_gives_retrain_bests_test_scores_and_entities_as_spans(ner_model, tmp_path):
    folder = ModelFolder.open(ner_model)
    test_file = folder.cfg.data.test
    out = tmp_path / "ner.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmflow_hpo",
            "predict",
            str(ner_model),
            test_file,
            "--evaluate",
            "--limit",
            "24",
            "--output",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    expected = _test_metrics(ner_model)
    assert expected["f1"] > 0  # the fixture's model finds some entities: the comparison is not of zeros
    for name in ("f1", "precision", "recall", "accuracy", "f1_LOC", "f1_ORG"):
        assert summary["metrics"][name] == pytest.approx(expected[name], abs=1e-12), name
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["count"] == len(records) == 24
    found = 0
    for r in records:
        assert len(r["tags"]) == len(r["words"])
        for e in r["entities"]:
            found += 1
            assert (
                r["text"][e["start_char"] : e["end_char"]]
                == e["text"]
                == " ".join(r["words"][e["start_word"] : e["end_word"]])
            )
            assert r["tags"][e["start_word"]][2:] == e["type"] and 0 < e["score"] <= 1
    assert found > 0


def test_predict_reads_plain_text_with_offsets_into_the_text_as_given(ner_model, monkeypatch, capsys):
    import io

    monkeypatch.setattr(
        sys, "stdin", io.StringIO("Ada  Lovelace met Charles Babbage in London.\n\nSecond   line, here\n")
    )
    assert main(["predict", str(ner_model), "-"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in records] == ["Ada  Lovelace met Charles Babbage in London.", "Second   line, here"]
    assert records[0]["words"] == ["Ada", "Lovelace", "met", "Charles", "Babbage", "in", "London", "."]
    assert records[1]["words"] == ["Second", "line", ",", "here"]
    for r in records:
        for e in r["entities"]:  # the offsets index the text as sent, double spaces and all
            assert r["text"][e["start_char"] : e["end_char"]] == e["text"]


def test_unlabelled_files_of_every_training_format_are_read(ner_model, text_model, tmp_path):
    ner = Predictor(ModelFolder.open(ner_model))
    conll = tmp_path / "words.txt"
    conll.write_text("-DOCSTART-\n\nJohn\nSmith\n\nParis\nis\nbig\n")
    read = read_inputs(str(conll), ner, format=None, evaluate=False)
    assert read.gold is None and [i.words for i in read.inputs] == [("John", "Smith"), ("Paris", "is", "big")]
    jsonl = tmp_path / "words.jsonl"
    jsonl.write_text(json.dumps({"tokens": ["New", "York"]}) + "\n" + json.dumps({"text": "in Rome"}) + "\n")
    assert [i.words for i in read_inputs(str(jsonl), ner, format="jsonl", evaluate=False).inputs] == [
        ("New", "York"),
        ("in", "Rome"),
    ]
    import datasets

    datasets.Dataset.from_dict({"tokens": [["Bonn", "waits"]]}).to_parquet(str(tmp_path / "words.parquet"))
    read = read_inputs(str(tmp_path / "words.parquet"), ner, format="parquet", evaluate=False)
    assert read.gold is None and [i.words for i in read.inputs] == [("Bonn", "waits")]  # a table without tags
    text = Predictor(ModelFolder.open(text_model))
    tsv = tmp_path / "texts.tsv"
    tsv.write_text('sentence\n"quoted" good film\nbad   film\n')  # no label column; TSV quotes are text
    read = read_inputs(str(tsv), text, format=None, evaluate=False)
    assert read.gold is None and read.inputs == ['"quoted" good film', "bad film"]  # cleaned as training cleans
    records = text.predict(read.inputs)
    assert [sorted(r["probabilities"]) for r in records] == [["neg", "pos"]] * 2
    assert all(r["label"] == max(r["probabilities"], key=r["probabilities"].get) for r in records)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in records)


def test_text_classification_evaluate_matches_retrain_best_and_writes_csv(text_model, tmp_path, capsys):
    folder = ModelFolder.open(text_model)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(text_model), folder.cfg.data.test, "--evaluate", "--output", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected = _test_metrics(text_model)
    for name in ("accuracy", "macro_f1", "weighted_f1"):
        assert summary["metrics"][name] == pytest.approx(expected[name], abs=1e-12)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 24 and set(rows[0]) == {"text", "label", "score", "probabilities"}
    assert set(json.loads(rows[0]["probabilities"])) == {"neg", "pos"}


def test_causal_lm_predicts_bounded_completions_and_scores_them_as_training(lm_model, capsys):
    folder = ModelFolder.open(lm_model)
    expected = _test_metrics(lm_model)
    bs = str(folder.cfg.train.eval_batch_size)
    assert (
        main(
            [
                "predict",
                str(lm_model),
                folder.cfg.data.test,
                "--evaluate",
                "--batch-size",
                bs,
                "--json",
                "--output",
                "/dev/null",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    for name in ("exact_match", "token_f1", "label_accuracy"):  # the same greedy answers as retrain-best's test
        assert summary["metrics"][name] == pytest.approx(expected[name], abs=1e-12)
    predictor = Predictor(folder, max_new_tokens=2)
    records = predictor.predict([predictor.parse("Review: a fine film\nSentiment:")])
    assert set(records[0]) == {"prompt", "completion"}
    assert len(predictor.tokenizer(records[0]["completion"], add_special_tokens=False)["input_ids"]) <= 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "/nonexistent/model", "x.txt"], "no such model folder"),
        (["predict", "{tmp}", "x.txt"], "not an llmflow-hpo model folder (no metrics.json)"),
        (["predict", "{model}", "/nonexistent/input.txt"], "no such input file"),
        (["predict", "{model}", "{words}", "--evaluate"], "too few for token column"),  # no tags to score against
        (
            ["predict", "{model}", "{words}", "--output", "/nonexistent/dir/out.jsonl"],
            "not a file in an existing folder",
        ),
        (["predict", "{model}", "{words}", "--runtime", "onnx"], "no fp32 ONNX model"),
    ],
)
def test_bad_predict_input_is_one_line_and_exit_1(ner_model, tmp_path, capsys, args, message):
    words = tmp_path / "words.txt"
    words.write_text("John\nSmith\n")
    args = [a.format(tmp=tmp_path, model=ner_model, words=words) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("llmflow-hpo: error: ") and message in err[-1], err
