"""The real CLI in subprocesses on tiny data: search, trials, best, retrain-best, errors and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import study_made
from optuna.trial import TrialState

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_search_trials_best_and_retrain_best(write_study, tmp_path):
    config = write_study({"n_trials": 2, "pruner": {"name": "median", "options": {"n_startup_trials": 1}}})
    storage = f"sqlite:///{tmp_path / 'tiny-ner.db'}"

    run = cli("search", str(config), "--set", "train.epochs=1")
    assert run.returncode == 0, run.stderr
    assert "resolved config:" in run.stderr
    assert "finished 2/2" in run.stderr  # progress line: done / pruned / failed and best so far
    assert "best trial" in run.stdout and "retrain-best --study tiny-ner" in run.stdout
    assert "report --study tiny-ner" in run.stdout and "dashboard --study tiny-ner" in run.stdout
    assert "Traceback" not in run.stderr

    rows = json.loads(cli("trials", "--study", "tiny-ner", "--storage", storage, "--json").stdout)
    assert len(rows) == 2 and all(r["state"] in ("complete", "pruned") for r in rows)
    table = cli("trials", "--study", "tiny-ner", "--storage", storage)
    assert table.returncode == 0 and "learning_rate=" in table.stdout

    best = json.loads(cli("best", "--study", "tiny-ner", "--storage", storage, "--json").stdout)
    study = optuna.load_study(study_name="tiny-ner", storage=storage)
    assert best["number"] == study.best_trial.number and best["value"] == study.best_value

    out = tmp_path / "model"
    retrain = cli("retrain-best", "--study", "tiny-ner", "--storage", storage, "--output", str(out), "--json")
    assert retrain.returncode == 0, retrain.stderr
    result = json.loads(retrain.stdout)
    assert result["reproduced"] is True and result["dev_metrics"]["f1"] == study.best_value
    assert (out / "model.safetensors").exists() and "f1" in result["test_metrics"]

    # optuna-dashboard opens the same database and shows the trials with their learning curves.
    dashboard = _dashboard_get(
        storage, f"/api/studies/{optuna.storages.get_storage(storage).get_study_id_from_name('tiny-ner')}", "after=0"
    )
    assert dashboard["name"] == "tiny-ner" and len(dashboard["trials"]) == 2
    assert dashboard["objective_names"] == ["dev_f1"]
    assert all(t["intermediate_values"] for t in dashboard["trials"])

    # A rerun of a finished study adds nothing.
    again = cli("search", str(config), "--set", "train.epochs=1")
    assert again.returncode == 0 and "nothing to run" in again.stderr
    assert len(optuna.load_study(study_name="tiny-ner", storage=storage).trials) == 2


def _dashboard_get(storage: str, path: str, query: str = "") -> dict:
    """Call optuna-dashboard's own WSGI app (what `optuna-dashboard URL` serves) without a server."""
    import io
    import wsgiref.util

    from optuna_dashboard import wsgi

    environ: dict = {"PATH_INFO": path, "QUERY_STRING": query, "wsgi.input": io.BytesIO()}
    wsgiref.util.setup_testing_defaults(environ)
    status = []
    body = b"".join(wsgi(storage)(environ, lambda s, h, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), status
    return json.loads(body)


def test_known_errors_are_one_line_with_exit_1(write_study, tmp_path):
    config = write_study({"n_trials": 1})
    storage = f"sqlite:///{tmp_path / 'tiny-ner.db'}"
    optuna.create_study(study_name="other", storage=storage)
    cases = [
        (("retrain-best", "--study", "nope", "--storage", storage), "no study 'nope'"),
        (("trials", "--study", "nope", "--storage", f"sqlite:///{tmp_path / 'missing' / 'x.db'}"), "does not exist"),
        (("best", "--study", "nope", "--storage", f"sqlite:///{tmp_path / 'x.db'}"), "x.db does not exist"),
        (("search", str(config), "--set", "train.lerning_rate=1"), "train.lerning_rate: unknown key"),
        (("search", str(tmp_path / "absent.yaml")), "file not found"),
    ]
    for args, message in cases:
        run = cli(*args)
        assert run.returncode == 1, (args, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("llmflow-hpo: error:") and message in lines[0], run.stderr
    assert not (tmp_path / "x.db").exists()  # reading a study never creates a database
    assert cli("search").returncode == 2  # usage error
    assert cli("frobnicate").returncode == 2


def test_ctrl_c_leaves_the_study_consistent_and_exits_130(write_study, tmp_path):
    config = write_study({"n_trials": 50, "data": {"limit_train": 200}, "train": {"epochs": 5}})
    storage = f"sqlite:///{tmp_path / 'tiny-ner.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmflow_hpo", "search", str(config)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    running = False
    while time.monotonic() < deadline and not running:
        time.sleep(0.5)
        if study_made(storage):  # else not created yet
            trials = optuna.load_study(study_name="tiny-ner", storage=storage).trials
            running = any(t.state == TrialState.RUNNING for t in trials)
    assert running, "the search never started a trial"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    trials = optuna.load_study(study_name="tiny-ner", storage=storage).trials
    assert trials and all(t.state != TrialState.RUNNING for t in trials)
    interrupted, queued = trials[-2], trials[-1]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["fail_reason"] == "interrupted (SIGINT)"
    # Queued again with its parameters: the next search resumes it first.
    assert queued.state == TrialState.WAITING and queued.params == interrupted.params
    again = subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", "search", str(config), "--set", f"n_trials={len(trials) - 1}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert f"retrying trial {interrupted.number}" in again.stderr
    trials = optuna.load_study(study_name="tiny-ner", storage=storage).trials
    assert trials[queued.number].state == TrialState.COMPLETE
    assert trials[queued.number].user_attrs["retry_of"] == interrupted.number


def test_causal_lm_search_of_full_against_lora_then_retrain_best_merged(lm_study, tmp_path):
    """A causal-LM study that searches full fine-tuning against LoRA (and LoRA's rank), end to end."""
    space = {
        "adapter": {"type": "categorical", "choices": ["none", "lora"]},
        "lora_r": {"type": "categorical", "choices": [2, 4]},
        "learning_rate": {"type": "float", "low": 3e-3, "high": 1e-2, "log": True},
    }
    config = lm_study({"n_trials": 3, "objective": {"metric": "label_accuracy"}}, space)
    storage = f"sqlite:///{tmp_path / 'tiny-lm.db'}"
    run = cli("search", str(config), "--workers", "2")  # two worker processes share the study
    assert run.returncode == 0, run.stderr
    study = optuna.load_study(study_name="tiny-lm", storage=storage)
    trials = study.get_trials(states=[TrialState.COMPLETE])
    assert {t.params["adapter"] for t in trials} == {"none", "lora"}  # the design trials cover both
    for t in trials:
        samples = t.user_attrs["best_samples"]
        assert len(samples) == 2 and samples[0]["prompt"].startswith("Review: ")
        lora = t.params["adapter"] == "lora"
        assert (t.user_attrs["n_trainable"] < t.user_attrs["n_params"] / 2) is lora
    report = cli("report", "--study", "tiny-lm", "--storage", storage, "--output", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    best_samples = study.best_trial.user_attrs["best_samples"]
    assert "Generated answers at the best evaluation" in page and best_samples[0]["reference"] in page
    # A LoRA study of one trial: retrain-best reproduces it exactly and writes the adapter and the merged model.
    lora = cli(
        "search", str(config), "--set", "study_name=tiny-lora", "--set", "n_trials=1", "--set", "train.adapter=lora"
    )
    assert lora.returncode == 0, lora.stderr
    storage = f"sqlite:///{tmp_path / 'tiny-lora.db'}"
    study = optuna.load_study(study_name="tiny-lora", storage=storage)
    out = tmp_path / "model"
    retrain = cli(
        "retrain-best", "--study", "tiny-lora", "--storage", storage, "--output", str(out), "--merge", "--json"
    )
    assert retrain.returncode == 0, retrain.stderr
    result = json.loads(retrain.stdout)
    assert result["trial_number"] == study.best_trial.number
    assert result["reproduced"] is True  # the same adapter weights (digest) and dev score as the trial
    assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapter"]["lora"]["r"] == study.best_trial.params.get("lora_r", 8)
    assert metrics["adapter"]["adapter_bytes"] < metrics["adapter"]["merged_bytes"] / 3
    assert "LoRA adapter" in (out / "README.md").read_text() and not (out / "labels.json").exists()
    assert "label_accuracy" in result["test_metrics"] and metrics["test_samples"]
