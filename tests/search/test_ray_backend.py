"""backend: ray — the real CLI on a local Ray: the study read back from the optuna storage, resume, retries, PBT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest
from conftest import study_made
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from llmflow_hpo.errors import ConfigError

pytest.importorskip("ray.tune")

REPO = Path(__file__).resolve().parents[2]

# Dev loss is continuous from the first evaluation on, so ASHA has values to rank (a tiny model's F1 is 0 at first).
RAY_STUDY: dict[str, Any] = {
    "backend": "ray",
    "n_trials": 6,
    "objective": {"metric": "loss"},
    "sampler": {"name": "tpe"},
    "data": {"limit_train": 200},
    "train": {"epochs": 3},
    "ray": {"scheduler": "asha", "max_concurrent_trials": 2},
}


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def start_search(config: Path, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "llmflow_hpo", "search", str(config)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def load(tmp_path: Path, name: str = "tiny-ner") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'tiny-ner.db'}")


def running(tmp_path: Path) -> list[Any]:
    """The study's RUNNING trials, or none while the study is still being created."""
    if not study_made(f"sqlite:///{tmp_path / 'tiny-ner.db'}"):
        return []
    return load(tmp_path).get_trials(states=(TrialState.RUNNING,))


def ray_trials(run_dir: Path) -> list[Any]:
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(str(run_dir)).trials


def reported(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every result Ray recorded, per Ray trial id (its result.json lines)."""
    out = {}
    for folder in run_dir.iterdir():
        results = folder / "result.json"
        if results.is_file():
            rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
            if rows:
                out[rows[0]["trial_id"]] = rows
    return out


@pytest.mark.slow
def test_ray_study_lands_in_the_optuna_storage_and_retrains(write_study, tmp_path: Path) -> None:
    config = write_study({**RAY_STUDY, "tracking": "tensorboard"})
    result = cli("search", str(config), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # The search's progress display shows Ray's trials as the optuna backend's: here as JSON events.
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith('{"event"')]
    ended = {e["trial"]: e["state"] for e in events if e["event"] == "trial_finished"}
    assert "Traceback" not in result.stderr
    assert "ray: started a local Ray on 127.0.0.1" in result.stderr  # loopback only
    assert not (tmp_path / "ray" / "tmp").exists()  # Ray's temporary files were under the study's folder, now gone
    # The trials' staging folders went with their actor processes (a stopped trial leaves its last checkpoint).
    staging = list(Path(tempfile.gettempdir()).glob("llmflow-ray-trial-*"))
    assert not [f for f in staging if not psutil.pid_exists(int(f.name.rsplit("-", 1)[-1]))]

    study = load(tmp_path)
    trials = study.get_trials()
    run_dir = tmp_path / "ray" / "tiny-ner-run1"
    results = reported(run_dir)
    assert len(trials) == 6 and len(results) == 6
    by_ray_id = {t.user_attrs["ray_trial_id"]: t for t in trials}
    assert set(by_ray_id) == set(results)
    max_step = 3 * 200
    for ray_id, rows in results.items():
        t = by_ray_id[ray_id]
        assert t.user_attrs["backend"] == "ray" and t.user_attrs["ray_run"] == "tiny-ner-run1"
        # The same evaluations: every value Ray got, at the step (examples seen) it was reported at.
        assert t.intermediate_values == {row["step"]: row["dev_loss"] for row in rows}
        assert t.params == {k: rows[0]["config"][k] for k in ("learning_rate", "batch_size")}
        if rows[-1]["final"]:
            assert t.state == TrialState.COMPLETE
            assert t.value == min(row["dev_loss"] for row in rows)  # the best evaluation, not the last one
            assert t.user_attrs["best_step"] in t.intermediate_values
            assert t.user_attrs["train_time_s"] > 0 and t.user_attrs["evaluations"] == len(t.intermediate_values)
            assert max(t.intermediate_values) == max_step
        else:
            assert t.state == TrialState.PRUNED
            assert t.user_attrs["stopped_by"] == "asha"
            assert t.user_attrs["pruned_at_step"] == rows[-1]["step"] < max_step
    assert ended == {t.number: t.state.name for t in trials}
    states = [t.state for t in trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states  # ASHA stopped some, not all
    # The driver tracked every trial from Ray's results: its curve of every dev metric, at the study's steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for t in trials:
        events = EventAccumulator(str(tmp_path / "tensorboard" / "tiny-ner" / f"trial-{t.number:04d}"))
        events.Reload()
        assert {e.step: e.value for e in events.Scalars("dev/loss")} == pytest.approx(t.intermediate_values)
        assert "dev/f1" in events.Tags()["scalars"]
    # Ray's own view of the run agrees: every trial terminated, none errored.
    assert {t.status for t in ray_trials(run_dir)} == {"TERMINATED"}
    assert not list(run_dir.glob("*/checkpoint_*"))  # finished trials' checkpoints are dropped

    listing = cli("trials", "--study", "tiny-ner", "--storage", f"sqlite:///{tmp_path / 'tiny-ner.db'}", cwd=tmp_path)
    assert listing.returncode == 0 and listing.stdout.count("pruned") == states.count(TrialState.PRUNED)
    retrain = cli(
        "retrain-best",
        "--study",
        "tiny-ner",
        "--storage",
        f"sqlite:///{tmp_path / 'tiny-ner.db'}",
        "--output",
        str(tmp_path / "best"),
        "--json",
        cwd=tmp_path,
    )
    assert retrain.returncode == 0, retrain.stderr[-2000:]
    out = json.loads(retrain.stdout)
    assert out["trial_number"] == study.best_trial.number
    assert out["metric"] == "loss" and out["test_metrics"]["loss"] > 0
    assert (tmp_path / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_interrupted_ray_search_continues_where_it_stopped(write_study, tmp_path: Path) -> None:
    config = write_study({**RAY_STUDY, "n_trials": 2, "ray": {"scheduler": "none", "max_concurrent_trials": 2}})
    proc = start_search(config, tmp_path)
    deadline = time.monotonic() + 180
    try:
        # Stop once a running trial has reported at least two evaluations (so it has a checkpoint).
        while time.monotonic() < deadline:
            if [t for t in running(tmp_path) if len(t.intermediate_values) >= 2]:
                break
            time.sleep(0.5)
        else:
            pytest.fail("no trial reported two evaluations in time")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    assert "rerun the same command to continue it" in err
    left = running(tmp_path)
    assert left  # left for the restore, not failed
    interrupted = {t.number for t in left}

    # The rerun asks for one trial more: the interrupted run is restored first, then a new run adds the missing one.
    again = cli("search", str(config), "--set", "n_trials=3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the interrupted Ray run tiny-ner-run1" in again.stderr
    assert "Ray run tiny-ner-run2: 1 trial(s)" in again.stderr
    trials = load(tmp_path).get_trials()
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3
    assert [t.user_attrs["ray_run"] for t in trials].count("tiny-ner-run2") == 1
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)]
    resumed = [t for t in trials if t.number in interrupted and t.user_attrs.get("resumed_at_step")]
    assert resumed, "no interrupted trial resumed from its checkpoint"
    for t in resumed:
        assert t.user_attrs["resumed_at_step"] > 0
        assert sorted(t.intermediate_values) == [100 * k for k in range(1, 7)]  # nothing lost, nothing twice


@pytest.mark.slow
def test_a_killed_ray_worker_is_retried_from_its_checkpoint(write_study, tmp_path: Path) -> None:
    config = write_study(
        {**RAY_STUDY, "n_trials": 1, "ray": {"scheduler": "none", "max_failures": 2}, "data": {"limit_train": 400}}
    )
    proc = start_search(config, tmp_path)
    deadline = time.monotonic() + 180
    killed = None
    try:
        # The running trial names its worker process ("host:pid"); kill it once the trial is past its first checkpoint.
        while time.monotonic() < deadline and killed is None and proc.poll() is None:
            now = running(tmp_path)
            if now and len(now[0].intermediate_values) >= 2 and "worker" in now[0].user_attrs:
                pid = int(now[0].user_attrs["worker"].rsplit(":", 1)[1])
                assert pid in {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
                os.kill(pid, signal.SIGKILL)
                killed = pid
            time.sleep(0.3)
        assert killed is not None, "found no Ray trial process to kill"
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Ray restarts it from its last checkpoint" in err
    (t,) = load(tmp_path).get_trials()
    assert t.state == TrialState.COMPLETE
    assert t.user_attrs["ray_failures"] == 1
    assert t.user_attrs["resumed_at_step"] > 0
    assert t.user_attrs["worker"].rsplit(":", 1)[1] != str(killed)  # finished by the process Ray restarted
    assert sorted(t.intermediate_values) == [200 * k for k in range(1, 7)]


@pytest.mark.slow
def test_pbt_on_a_joined_cluster_clones_checkpoints_and_records_the_changes(write_study, tmp_path: Path) -> None:
    # A Ray cluster started beforehand (`ray start --head`), joined with --ray-address auto.
    ray_cli = Path(sys.executable).with_name("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    started = subprocess.run(
        [str(ray_cli), "start", "--head", "--port=0", "--num-cpus=2", "--include-dashboard=false"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        config = write_study({**RAY_STUDY, "n_trials": 4, "ray": {"scheduler": "pbt", "max_concurrent_trials": 2}})
        result = cli("search", str(config), "--ray-address", "auto", cwd=tmp_path)
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ray: joined the cluster at auto" in result.stderr
    trials = load(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    changed = [t for t in trials if t.user_attrs.get("pbt_schedule")]
    # PBT's bottom quarter (one trial of four) clones the top trial's checkpoint at each perturbation.
    assert changed
    for t in changed:
        # It continued from a checkpoint (another trial's: PBT's exploit), with a mutated learning rate.
        assert t.user_attrs["resumed_at_step"] > 0
        assert any(c["params"]["learning_rate"] != t.params["learning_rate"] for c in t.user_attrs["pbt_schedule"])
        assert sorted(t.intermediate_values) == [100 * k for k in range(1, 7)]
    assert not list((tmp_path / "ray").glob("*/*/checkpoint_*"))  # kept during the run, dropped at its end


# ----------------------------------------------------------------------------------------------------
# Fast checks: configuration, errors, the search-space conversion.


def test_search_space_becomes_ray_domains() -> None:
    from llmflow_hpo.search.backends.ray_backend.schedulers import tune_domain

    lr = tune_domain(FloatDistribution(1e-5, 1e-3, log=True))
    assert type(lr).__name__ == "Float" and lr.lower == 1e-5 and lr.upper == 1e-3
    draws = [lr.sample() for _ in range(2000)]
    assert all(1e-5 <= v <= 1e-3 for v in draws)
    assert 0.4 < sum(v < 1e-4 for v in draws) / len(draws) < 0.6  # log-uniform: half below the geometric middle
    bs = tune_domain(CategoricalDistribution([8, 16, 32]))
    assert bs.categories == [8, 16, 32]
    ep = tune_domain(IntDistribution(1, 3))
    assert {ep.sample() for _ in range(200)} == {1, 2, 3}  # inclusive upper bound, as optuna's
    stepped = tune_domain(FloatDistribution(0.0, 0.2, step=0.05))
    assert all(round(v / 0.05, 9) == round(v / 0.05) for v in (stepped.sample() for _ in range(50)))
    # optuna's points are low + k * step (tune.quniform rounds to multiples of step: 0.1, 0.2 here)
    offset = FloatDistribution(0.05, 0.25, step=0.1)
    draws = [tune_domain(offset).sample() for _ in range(300)]
    assert {round(v, 9) for v in draws} == {0.05, 0.15, 0.25}
    assert all(offset._contains(v) for v in draws)


def test_a_ray_trial_becomes_a_study_trial_of_its_own_parameters(tmp_path: Path) -> None:
    """PBT's trials are made by Ray; enqueue-then-ask took the oldest WAITING trial, which may be another one."""
    from types import SimpleNamespace

    from llmflow_hpo.search.backends.ray_backend.recorder import StudyRecorder

    space = {"learning_rate": FloatDistribution(1e-4, 1e-2, log=True), "batch_size": CategoricalDistribution([8, 16])}
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="pbt", storage=storage)
    study.enqueue_trial({"learning_rate": 1e-3, "batch_size": 8})  # e.g. a retry queued by an optuna worker
    recorder = StudyRecorder(
        storage=storage,
        study_name="pbt",
        space=space,
        key="dev_f1",
        metric="f1",
        run="pbt-run1",
        scheduler="pbt",
        target=4,
    )
    number = recorder._number(SimpleNamespace(trial_id="t1", config={"learning_rate": 5e-3, "batch_size": 16}))
    trials = optuna.load_study(study_name="pbt", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.WAITING, TrialState.RUNNING]  # the queued one is left queued
    assert number == trials[1].number and trials[1].params == {"learning_rate": 5e-3, "batch_size": 16}
    assert trials[1].user_attrs == {"ray_trial_id": "t1", "ray_run": "pbt-run1", "backend": "ray"}
    assert recorder._number(SimpleNamespace(trial_id="t1", config={})) == number  # found again, not made twice


def test_scheduler_defaults_follow_the_evaluation_schedule(tiny_cfg) -> None:
    from llmflow_hpo.search.backends.ray_backend.schedulers import build_scheduler

    cfg, space, _ = tiny_cfg({"backend": "ray", "train": {"epochs": 3, "evals_per_epoch": 2}})
    asha = build_scheduler(cfg, space, n_train=200, source="study.yaml")
    assert asha._time_attr == "step"
    assert asha._max_t == 3 * 200 + 1
    # Rungs at the first evaluation (grace period: 200 examples / 2 evaluations per epoch) and 3x later.
    assert sorted(milestone for milestone, _ in asha._brackets[0]._rungs) == [100, 300]
    # The first evaluation is at round(49 / 2) = 24 examples (train.py's points), not at ceil(24.5) = 25,
    # where it would not be judged.
    odd = build_scheduler(cfg, space, n_train=49, source="study.yaml")
    assert min(milestone for milestone, _ in odd._brackets[0]._rungs) == 24


def test_a_trial_failure_on_ray_stores_the_reason_the_optuna_backend_stores() -> None:
    """A non-finite dev metric (or a diverged run) is FAIL with its reason on both backends, in the same words."""
    from types import SimpleNamespace

    from llmflow_hpo.search.backends.ray_backend.recorder import trial_error

    def trial(text: str) -> Any:
        return SimpleNamespace(get_pickled_error=lambda: None, get_error=lambda: text, error_file=None)

    # The last line of Ray's error for a trainable that raised TrialFailure (seen with Ray 2.x).
    raised = (
        "Traceback (most recent call last):\n  File ...\nllmflow_hpo.errors.TrialFailure: dev f1 is nan at step 24\n"
    )
    assert trial_error(trial(raised))[0] == "dev f1 is nan at step 24"
    assert trial_error(trial("Traceback ...\nValueError: boom"))[0] == "error: ValueError: boom"


def test_pbt_mutates_choices_and_stepped_floats_within_their_values(tiny_cfg) -> None:
    from llmflow_hpo.search.backends.ray_backend.schedulers import build_scheduler

    space = {
        "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "warmup_ratio": {"type": "float", "low": 0.05, "high": 0.25, "step": 0.1},
        "label_smoothing": {"type": "categorical", "choices": [0.0, 0.1]},
    }
    cfg, dist, _ = tiny_cfg({"backend": "ray", "ray": {"scheduler": "pbt"}}, space=space)
    mutations = build_scheduler(cfg, dist, n_train=200, source="study.yaml")._hyperparam_mutations
    # Lists: PBT shifts to a neighbouring value; a domain's value it multiplies by 0.8 or 1.2 (off the grid).
    assert [round(v, 9) for v in mutations["warmup_ratio"]] == [0.05, 0.15, 0.25]
    assert mutations["label_smoothing"] == [0.0, 0.1]
    assert type(mutations["learning_rate"]).__name__ == "Float"


def test_hyperband_counts_evaluations(tiny_cfg) -> None:
    from llmflow_hpo.search.backends.ray_backend.schedulers import build_scheduler

    cfg, space, _ = tiny_cfg(
        {"backend": "ray", "train": {"epochs": 3, "evals_per_epoch": 2}, "ray": {"scheduler": "hyperband"}}
    )
    hyperband = build_scheduler(cfg, space, n_train=200, source="study.yaml")
    # Its smallest budget is one time unit: one evaluation, not one example.
    assert hyperband._time_attr == "evaluation" and hyperband._max_t_attr == 3 * 2 + 1


def test_scheduler_options_are_checked(tiny_cfg) -> None:
    from llmflow_hpo.search.backends.ray_backend.schedulers import build_scheduler

    cfg, space, _ = tiny_cfg({"backend": "ray", "ray": {"scheduler_options": {"grace_perod": 3, "metric": "x"}}})
    with pytest.raises(ConfigError) as e:
        build_scheduler(cfg, space, n_train=200, source="study.yaml")
    assert "ray.scheduler_options.grace_perod: not an option of Ray's AsyncHyperBandScheduler" in str(e.value)
    assert "ray.scheduler_options.metric: set by llmflow-hpo" in str(e.value)
    cfg, space, _ = tiny_cfg(
        {"backend": "ray", "ray": {"scheduler": "pbt"}}, {"batch_size": {"type": "categorical", "choices": [8, 16]}}
    )
    with pytest.raises(ConfigError, match="pbt mutates learning_rate"):
        build_scheduler(cfg, space, n_train=200, source="study.yaml")


def test_pbt_mutates_the_settings_declared_mutable() -> None:
    """PBT's list is the declaration's (config/hyperparameters.py), and it is the set it always was: settings that
    change neither the model's shape, the optimizer's kind nor the run's length."""
    from llmflow_hpo.config.hyperparameters import HYPERPARAMETERS
    from llmflow_hpo.search.backends.ray_backend.schedulers import PBT_MUTABLE

    assert set(PBT_MUTABLE) == {
        "learning_rate",
        "weight_decay",
        "warmup_ratio",
        "hidden_dropout",
        "attention_dropout",
        "label_smoothing",
        "max_grad_norm",
        "momentum",
        "focal_gamma",
    }
    assert all(HYPERPARAMETERS[name].searchable for name in PBT_MUTABLE)


def test_ray_settings_are_validated(write_study, tmp_path: Path) -> None:
    config = write_study(
        {"backend": "ray", "n_trials": None, "timeout": 60, "ray": {"cpus_per_trial": 0, "max_concurrent_trials": 0}}
    )
    result = cli("validate", str(config), cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    assert "n_trials: backend ray needs n_trials" in result.stderr
    assert "ray.cpus_per_trial: must be > 0" in result.stderr
    assert "ray.max_concurrent_trials: must be >= 1 or null" in result.stderr
    assert "Traceback" not in result.stderr


BLOCK_RAY = """\
import sys
class _NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoRay())
"""


def test_without_ray_the_ray_backend_is_a_one_line_error(write_study, tmp_path: Path) -> None:
    (tmp_path / "noray").mkdir()
    (tmp_path / "noray" / "sitecustomize.py").write_text(BLOCK_RAY)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "noray")}
    config = write_study({"backend": "ray"})
    for args in (
        ["validate", str(config)],
        ["search", str(config)],
        ["search", str(write_study({}, name="o.yaml")), "--backend", "ray"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "llmflow_hpo", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 1, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("llmflow-hpo: error")]
        assert len(lines) == 1 and "pip install 'llmflow-hpo[ray]'" in lines[0], result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "tiny-ner.db").exists()  # refused before any study was made


def test_workers_and_the_ray_backend_do_not_mix(write_study, tmp_path: Path) -> None:
    result = cli("search", str(write_study({})), "--backend", "ray", "--workers", "2", cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    assert "--workers 2: backend ray runs its trials through Ray; set ray.max_concurrent_trials" in result.stderr


def _errored(trial_id: str, error: str) -> Any:
    """A Ray trial that failed more than ray.max_failures times, as Ray hands it to its callbacks."""
    from types import SimpleNamespace

    return SimpleNamespace(
        trial_id=trial_id,
        config={"learning_rate": 1e-3},
        last_result={},
        num_failures=3,
        path=None,
        get_pickled_error=lambda: None,
        get_error=lambda: error,
        error_file=None,
    )


def test_a_trial_failure_on_ray_is_failed_for_good_as_on_the_optuna_backend(tmp_path: Path) -> None:
    """reporting.record_failure, both backends' rule: a TrialFailure (diverged, a non-finite metric, out of
    memory) is stored with ``failed_for_good``, a retry being pointless; any other error is not. (The Ray
    recorder used to store the reason alone.)"""
    from llmflow_hpo.search.backends.ray_backend.recorder import StudyRecorder

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="fail", storage=storage)
    recorder = StudyRecorder(
        storage=storage,
        study_name="fail",
        space={"learning_rate": FloatDistribution(1e-4, 1e-2, log=True)},
        key="dev_f1",
        metric="f1",
        run="fail-run1",
        scheduler="asha",
        target=2,
    )
    recorder.on_trial_error(
        0, [], _errored("t1", "Traceback ...\nllmflow_hpo.errors.TrialFailure: dev f1 is nan at step 24")
    )
    recorder.on_trial_error(0, [], _errored("t2", "Traceback ...\nValueError: boom"))
    diverged, crashed = optuna.load_study(study_name="fail", storage=storage).trials
    assert diverged.state == crashed.state == TrialState.FAIL
    assert diverged.user_attrs["fail_reason"] == "dev f1 is nan at step 24"
    assert diverged.user_attrs["failed_for_good"] is True
    assert crashed.user_attrs["fail_reason"] == "error: ValueError: boom"
    assert "failed_for_good" not in crashed.user_attrs
    assert diverged.user_attrs["ray_failures"] == 3


def test_a_ray_study_whose_grid_is_done_runs_nothing(tiny_cfg, monkeypatch, tmp_path: Path) -> None:
    """The driver's rule for both backends: a grid whose every point has run (one failed) is done; Ray used to
    start a run that drew a point of the grid again."""
    from llmflow_hpo.search.backends import run_search
    from llmflow_hpo.search.spaces import suggest_params
    from llmflow_hpo.search.strategy import build_sampler

    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AIR_NEW_OUTPUT"):  # restored after the test
        monkeypatch.setenv(name, os.environ.get(name, "0"))
    grid = {"batch_size": {"type": "categorical", "choices": [8, 16]}}
    changes = {"n_trials": 1, "sampler": {"name": "grid"}, "train": {"epochs": 1}}
    cfg, space, raw = tiny_cfg(changes, space=grid)
    assert run_search(cfg, space, raw, log=lambda _: None).counts["complete"] == 1
    study = optuna.load_study(study_name=cfg.study_name, storage=cfg.storage, sampler=build_sampler(cfg, space))
    trial = study.ask()  # the grid's other point, failed
    suggest_params(trial, space)
    study.tell(trial, state=TrialState.FAIL)
    lines: list[str] = []
    ray_cfg, space, raw = tiny_cfg({**changes, "n_trials": 2, "backend": "ray"}, space=grid)
    summary = run_search(ray_cfg, space, raw, log=lines.append)
    assert summary.ran == 0 and summary.counts["complete"] == 1 and summary.counts["fail"] == 1
    assert f"study {cfg.study_name}: the grid is done, each of its 2 point(s) has run; nothing to run" in lines
    assert not (tmp_path / "ray").exists()  # no Ray run was started


def test_validate_checks_the_scheduler_options_without_torch(write_study, tmp_path: Path) -> None:
    """validate applies build_scheduler's rules (schedulers.scheduler_problems) where Ray is installed; Ray's
    schedulers import neither torch nor transformers, so validate still does not."""
    bad = write_study({"backend": "ray", "ray": {"scheduler": "median", "scheduler_options": {"grace_perod": 3}}})
    result = cli("validate", str(bad), cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "ray.scheduler_options.grace_perod: not an option of Ray's MedianStoppingRule" in result.stderr
    pbt = write_study(
        {"backend": "ray", "ray": {"scheduler": "pbt"}},
        {"batch_size": {"type": "categorical", "choices": [8, 16]}},
        name="pbt.yaml",
    )
    result = cli("validate", str(pbt), cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and "ray.scheduler: pbt mutates learning_rate" in result.stderr
    good = write_study({"backend": "ray"}, name="good.yaml")
    probe = (
        "import sys\nfrom llmflow_hpo.cli import main\n"
        f"rc = main(['validate', {str(good)!r}])\n"
        "print('PROBE', rc, 'torch' in sys.modules, 'transformers' in sys.modules, 'ray.tune' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "PROBE 0 False False True", result.stderr


def test_the_budget_on_ray_starts_no_trial_that_does_not_fit_and_ends_a_run_at_an_evaluation(
    tiny_cfg, monkeypatch
) -> None:
    """Ray's time_budget_s would kill the running trials (FAIL, lost): the budget is the searcher's and the
    trainable's, as on the optuna backend."""
    from ray.tune.search import Searcher

    from llmflow_hpo.recipe.results import Evaluation
    from llmflow_hpo.search.backends.ray_backend import trainable
    from llmflow_hpo.search.backends.ray_backend.recorder import StudySearch
    from llmflow_hpo.search.budget import Budget
    from llmflow_hpo.study import records

    spent, fresh = Budget(10.0, ends_at=time.time() - 1), Budget(3600.0)
    space = {"learning_rate": FloatDistribution(1e-4, 1e-2, log=True)}

    def search(budget: Budget) -> StudySearch:
        return StudySearch(run="b-run1", space=dict(space), metric="dev_f1", mode="max", budget=budget)

    assert search(spent).suggest("t1") == Searcher.FINISHED
    assert set(search(fresh).suggest("t1")) == {"learning_rate"}
    earlier = StudySearch.__new__(StudySearch)  # as restored from the state an earlier version pickled
    earlier.__dict__.update({k: v for k, v in search(fresh).__dict__.items() if k != "_budget"})
    assert set(earlier.suggest("t2")) == {"learning_rate"}

    cfg, _, _ = tiny_cfg({"backend": "ray"})
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(trainable.tune, "report", lambda report, checkpoint=None: sent.append(report))
    evaluation = Evaluation(step=24, examples_seen=24, optimizer_step=3, epoch=0.5, metrics={"f1": 0.5}, train_loss=1.0)
    assert trainable.RayReporter(cfg, None, 48, fresh)(evaluation) is False
    reporter = trainable.RayReporter(cfg, None, 48, spent)
    assert reporter(evaluation) is True  # the run ends here
    assert reporter.extra[records.STOPPED_BY_BUDGET] is True and len(sent) == 2


def test_a_causal_lm_study_runs_on_ray_with_tracking_and_generated_samples(lm_study, tmp_path: Path) -> None:
    config = lm_study(
        {"backend": "ray", "n_trials": 2, "tracking": "tensorboard", "ray": {"scheduler": "none", "max_concurrent_trials": 1}},
        {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
         "adapter": {"type": "categorical", "choices": ["none", "lora"]}},
    )  # fmt: skip
    result = cli("search", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="tiny-lm", storage=f"sqlite:///{tmp_path / 'tiny-lm.db'}")
    trials = study.get_trials(states=[TrialState.COMPLETE])
    assert len(trials) == 2 and all(t.user_attrs["backend"] == "ray" for t in trials)
    assert all(len(t.user_attrs["best_samples"]) == 2 and "dev_perplexity" in t.user_attrs for t in trials)
    assert list((tmp_path / "tensorboard" / "tiny-lm").glob("trial-*/events.out.tfevents.*"))
