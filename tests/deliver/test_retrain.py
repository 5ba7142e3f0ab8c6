"""retrain-best: from the storage alone to a finished model folder that reproduces the best trial."""

from __future__ import annotations

import json

import pytest
import yaml

from llmflow_hpo.deliver.retrain import retrain_best
from llmflow_hpo.errors import LlmflowError, StorageError
from llmflow_hpo.search.backends import run_search
from llmflow_hpo.study.storage import load_study

QUIET = {"log": lambda _: None}


@pytest.fixture
def finished_study(tiny_cfg, tmp_path):
    cfg, space, raw = tiny_cfg({"n_trials": 2, "train": {"early_stopping_patience": 1, "epochs": 3}})
    run_search(cfg, space, raw, **QUIET)
    # The YAML files on disk may change or vanish: retrain-best reads the storage alone.
    (tmp_path / "study.yaml").unlink()
    (tmp_path / "space.yaml").unlink()
    return cfg


def test_retrain_on_train_reproduces_the_best_trial_exactly(finished_study, tmp_path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    cfg = finished_study
    best = load_study(cfg.study_name, cfg.storage).best_trial
    out = tmp_path / "model"
    result = retrain_best(study_name=cfg.study_name, storage=cfg.storage, output_dir=out, **QUIET)
    assert result.trial_number == best.number
    assert result.reproduced is True
    assert result.dev_metrics["f1"] == best.value
    assert result.dev_metrics["f1"] == best.user_attrs["dev_f1"]
    assert set(result.test_metrics) >= {"f1", "precision", "recall", "accuracy"}

    files = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "labels.json",
        "metrics.json",
        "study_config.yaml",
        "README.md",
    } <= files
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"] == result.test_metrics and metrics["reproduced_trial"] is True
    assert metrics["examples_seen"] >= best.user_attrs["best_step"]
    labels = json.loads((out / "labels.json").read_text())["labels"]
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert [model.config.id2label[i] for i in range(len(labels))] == labels
    assert AutoTokenizer.from_pretrained(out)("Paris")["input_ids"]
    stored = yaml.safe_load((out / "study_config.yaml").read_text())
    assert stored["best_params"] == best.params
    card = (out / "README.md").read_text()
    assert f"best trial {best.number}" in card and "learning_rate" in card and "Test" in card


def test_retrain_on_train_plus_dev_trains_as_many_epochs(finished_study, tmp_path):
    cfg = finished_study
    best = load_study(cfg.study_name, cfg.storage).best_trial
    result = retrain_best(
        study_name=cfg.study_name, storage=cfg.storage, output_dir=tmp_path / "m2", train_on="train+dev", **QUIET
    )
    assert result.reproduced is None  # dev was trained on: it is no estimate any more
    metrics = json.loads((tmp_path / "m2" / "metrics.json").read_text())
    epochs = best.user_attrs["best_step"] / 48
    assert metrics["trained_on"] == "train+dev"
    assert metrics["examples_seen"] >= epochs * (48 + 24)
    assert metrics["examples_seen"] < epochs * (48 + 24) + 16


def test_retrain_refuses_to_overwrite_a_foreign_folder(finished_study, tmp_path):
    cfg = finished_study
    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(LlmflowError, match="not an llmflow-hpo model folder"):
        retrain_best(study_name=cfg.study_name, storage=cfg.storage, output_dir=mine, **QUIET)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_retrain_of_a_missing_study_names_the_studies_there(finished_study):
    with pytest.raises(StorageError, match=r"no study 'nope' .*studies there: tiny-ner"):
        retrain_best(study_name="nope", storage=finished_study.storage, **QUIET)


def test_retrain_runs_with_the_trials_thread_count_and_compares_weights(tiny_cfg, tmp_path, monkeypatch):
    """A worker trains with its share of the cores; the weights depend on the thread count (CPU reductions)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(before, 2))  # 2 threads to differ from the worker's 1 (a test worker may have 1 core)
    try:
        _retrain_with_the_trials_threads(tiny_cfg, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(before)


def _retrain_with_the_trials_threads(tiny_cfg, tmp_path, monkeypatch) -> None:
    import torch

    cfg, space, raw = tiny_cfg({"n_trials": 1, "train": {"epochs": 1, "num_threads": 1}})
    run_search(cfg, space, raw, **QUIET)
    study = load_study(cfg.study_name, cfg.storage)
    stored = study.user_attrs["config"]
    stored["train"]["num_threads"] = None  # as a study made by `search --workers N`: only the workers set it
    study.set_user_attr("config", stored)
    best = study.best_trial
    assert best.user_attrs["torch_threads"] == 1 and len(best.user_attrs["best_weights_sha256"]) == 64
    lines: list[str] = []
    result = retrain_best(study_name=cfg.study_name, storage=cfg.storage, output_dir=tmp_path / "m", log=lines.append)
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["weights_sha256"] == {
        "model": best.user_attrs["best_weights_sha256"],
        "trial": best.user_attrs["best_weights_sha256"],
    }
    assert result.reproduced is True
    assert any("1 torch threads, as trial 0 ran with" in line for line in lines)
    assert torch.get_num_threads() >= 2  # put back after the run

    # Weights that differ are reported, even where the dev score is equal.
    monkeypatch.setattr("llmflow_hpo.recipe.evaluation.weights_digest", lambda model: "0" * 64)
    again = retrain_best(study_name=cfg.study_name, storage=cfg.storage, output_dir=tmp_path / "m", **QUIET)
    assert again.dev_metrics[cfg.metric] == best.value and again.reproduced is False


def test_retrain_takes_the_best_trial_by_the_study_views_rule():
    """The best trial of retrain-best is the study view's (the earlier on ties), and none complete is refused."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from llmflow_hpo.deliver.retrain import _best_trial
    from llmflow_hpo.study.view import StudyView

    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(state=TrialState.FAIL))
    with pytest.raises(StorageError, match="has no complete trial yet"):
        _best_trial(StudyView.of(study), "demo")
    for value in (0.5, 0.9, 0.9):
        study.add_trial(create_trial(value=value, user_attrs={"best_step": 10}))
    assert _best_trial(StudyView.of(study), "demo").number == 2 == study.best_trial.number
