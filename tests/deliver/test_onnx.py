"""export --format onnx: the graph with dynamic axes, checked against PyTorch, its INT8 variant, and predict
running either through onnxruntime."""

from __future__ import annotations

import json
import shutil

import pytest

from llmflow_hpo.cli import main
from llmflow_hpo.deliver.model_folder import ModelFolder
from llmflow_hpo.deliver.predict import Predictor


@pytest.fixture(scope="module")
def exported(ner_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx") / "model"
    shutil.copytree(ner_model, folder)
    assert main(["export", str(folder), "--format", "onnx", "--json"]) == 0
    return folder


def test_export_checks_fp32_against_pytorch_and_reports_int8(exported):
    report = json.loads((exported / "onnx" / "report.json").read_text())
    folder = ModelFolder.open(exported)
    assert report["examples"] == folder.cfg.data.limit_dev == 24
    torch_run, fp32, int8 = (report["runtimes"][n] for n in ("torch", "onnx-fp32", "onnx-int8"))
    assert fp32["max_abs_logit_diff"] < 1e-4 and fp32["examples_with_other_labels"] == 0
    assert fp32["metrics"] == pytest.approx(torch_run["metrics"], abs=1e-9)
    assert 0 < int8["max_abs_logit_diff"] < 5  # quantized: close, not equal
    assert set(int8["metrics"]) == set(torch_run["metrics"]) and set(int8["examples_per_second"]) == {"1", "32"}
    assert report["files"]["int8"] < report["files"]["fp32"]


def test_onnx_runs_any_batch_and_length_and_predict_uses_it(exported, tmp_path):
    torch_p = Predictor(ModelFolder.open(exported))
    onnx_p = Predictor(ModelFolder.open(exported), runtime="onnx")
    int8_p = Predictor(ModelFolder.open(exported), runtime="onnx", quantized=True)
    texts = ["Ada met Bob in Paris .", " ".join(["word"] * 40), "Rome", "a b c d e f g"]  # lengths unlike the sample
    inputs = [torch_p.parse(t) for t in texts]
    expected = torch_p.predict(inputs)
    assert [r["tags"] for r in onnx_p.predict(inputs)] == [r["tags"] for r in expected]
    assert [len(r["tags"]) for r in int8_p.predict(inputs)] == [len(r["tags"]) for r in expected]
    assert onnx_p.runtime_name == "onnx-fp32" and int8_p.runtime_name == "onnx-int8"


def test_a_causal_lm_is_not_exported_and_says_why(lm_model, capsys):
    assert main(["export", str(lm_model)]) == 1
    assert "generates its answers" in capsys.readouterr().err
    assert not (lm_model / "onnx").exists()
