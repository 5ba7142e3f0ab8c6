"""Many workers on one study, on SQLite and on PostgreSQL: exact counting, killed workers, signals, resume.

PostgreSQL tests create a database of their own on the server at 127.0.0.1:5432 and drop it after;
they skip, saying why, only where no server answers there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import study_made
from optuna.trial import TrialState

from llmflow_hpo.search.workers import plan_workers

REPO = Path(__file__).resolve().parents[2]
PG_SERVER = "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=3"


# ----------------------------------------------------------------------------------------------------
# Dividing the machine


def test_cores_are_divided_between_workers():
    plans = plan_workers(2, cores=list(range(8)), gpus=[], device="auto", num_threads=None)
    assert [p.cores for p in plans] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [p.threads for p in plans] == [4, 4] and all(p.cuda_visible_devices is None for p in plans)


def test_more_workers_than_cores_share_them_with_one_thread_each():
    plans = plan_workers(4, cores=[0, 1], gpus=[], device="auto", num_threads=None)
    assert [p.cores for p in plans] == [[0], [1], [0], [1]] and {p.threads for p in plans} == {1}


def test_each_worker_gets_its_own_gpus():
    plans = plan_workers(2, cores=list(range(16)), gpus=["0", "1", "2", "3"], device="auto", num_threads=None)
    assert [p.cuda_visible_devices for p in plans] == ["0,1", "2,3"]
    shared = plan_workers(3, cores=list(range(16)), gpus=["4", "5"], device="cuda", num_threads=2)
    assert [p.cuda_visible_devices for p in shared] == ["4", "5", "4"] and {p.threads for p in shared} == {2}


def test_an_explicit_device_is_left_alone():
    for device in ("cpu", "cuda:1"):
        plans = plan_workers(2, cores=[0, 1], gpus=["0", "1"], device=device, num_threads=None)
        assert all(p.cuda_visible_devices is None for p in plans)


def test_a_spawned_worker_spends_its_start_up_from_the_searchs_budget(tiny_cfg, monkeypatch):
    from llmflow_hpo.search.budget import ENDS_AT, Budget
    from llmflow_hpo.search.workers import worker_command

    cfg, _, _ = tiny_cfg({"budget": "30m"})
    plan = plan_workers(1, cores=[0], gpus=[], device="auto", num_threads=None)[0]
    budget = Budget(1800.0, ends_at=time.time() + 100)
    command, env = worker_command(cfg, plan, budget)
    assert float(env[ENDS_AT]) == budget.ends_at
    given = [command[i + 1] for i, a in enumerate(command) if a == "--set" and command[i + 1].startswith("budget=")]
    assert 99 < float(given[0].partition("=")[2]) <= 100  # the seconds left
    monkeypatch.setenv(ENDS_AT, env[ENDS_AT])
    assert Budget.joined(97.0).ends_at == budget.ends_at  # not 97 s after the worker's own start-up
    monkeypatch.delenv(ENDS_AT)
    assert Budget.joined(60.0).left() > 59  # a worker started by hand: the budget from its start
    assert ENDS_AT not in worker_command(cfg, plan, None)[1]


# ----------------------------------------------------------------------------------------------------
# Storages


@pytest.fixture
def pg_url():
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_SERVER, autocommit=True)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL server answers at 127.0.0.1:5432 ({str(e).strip().splitlines()[0]})")
    name = f"llmflow_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("pg_url")


# ----------------------------------------------------------------------------------------------------
# Four workers, a fast objective: exactly n_trials


FAST_WORKER = textwrap.dedent(
    """
    import os, random, sys, time
    import optuna
    from llmflow_hpo.search.backends.optuna_backend import run_worker
    from llmflow_hpo.config.study import HeartbeatConfig
    from llmflow_hpo.study.lock import StudyLock
    from llmflow_hpo.study.storage import open_storage, retry_callback

    url, name, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    heartbeat = HeartbeatConfig(interval=1, grace_period=3)
    study = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat))

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("pid", os.getpid())
        time.sleep(random.uniform(0.0, 0.05))
        return x

    ran = run_worker(
        study, objective, target=target, lock=StudyLock(url, name), retry=retry_callback(heartbeat),
        heartbeat_interval=1, poll_seconds=0.2, log=lambda line: None,
    )
    print(ran)
    """
)


def test_four_workers_finish_exactly_n_trials(storage_url):
    target = 30
    optuna.create_study(study_name="fast", storage=storage_url)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FAST_WORKER, storage_url, "fast", str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    assert sum(int(out.strip()) for out, _ in outputs) == target
    trials = optuna.load_study(study_name="fast", storage=storage_url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * target  # nothing failed, nothing left over
    assert sorted(t.number for t in trials) == list(range(target))
    assert len({t.user_attrs["pid"] for t in trials}) >= 2  # they really ran side by side


def test_an_interrupted_trial_another_worker_failed_as_stale_is_queued_once(tmp_path):
    from llmflow_hpo.config.study import HeartbeatConfig
    from llmflow_hpo.search.backends.optuna_backend import run_worker
    from llmflow_hpo.study.lock import StudyLock
    from llmflow_hpo.study.optuna_private import storage_of, stored_trial, trial_id
    from llmflow_hpo.study.storage import open_storage, retry_callback

    url = f"sqlite:///{tmp_path / 'study.db'}"
    heartbeat = HeartbeatConfig(interval=1, grace_period=3)
    study = optuna.create_study(study_name="stale", storage=open_storage(url, heartbeat))
    retry = retry_callback(heartbeat)

    def objective(trial):
        trial.suggest_float("x", 0.0, 1.0)
        # Another worker missed this trial's heartbeat: it failed the trial and queued its retry
        # (what optuna.storages.fail_stale_trials does) ... then this worker is interrupted.
        storage_of(study).set_trial_state_values(trial_id(trial), state=TrialState.FAIL)
        retry(study, stored_trial(study, trial))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_worker(study, objective, target=1, lock=StudyLock(url, "stale"), retry=retry, log=lambda line: None)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # one retry, not two
    assert trials[1].params == trials[0].params


# ----------------------------------------------------------------------------------------------------
# The real CLI on tiny data


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llmflow_hpo", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


# Trials of a few seconds with six evaluations each; a dead worker's trial is found within 2-3 s.
SLOW_TRIALS = {
    "n_trials": 2,
    "data": {"limit_train": 200, "limit_dev": 48},
    "train": {"epochs": 6},
    "heartbeat": {"interval": 1, "grace_period": 2},
    "checkpoint": {"max_overhead": 1.0},  # after every evaluation, whatever the write costs
}


def _trials(storage: str, name: str = "tiny-ner") -> list[optuna.trial.FrozenTrial]:
    if not study_made(storage, name):  # not created yet
        return []
    return optuna.load_study(study_name=name, storage=storage).trials


def _wait_for_running_trial(
    storage: str, checkpoints: Path, min_evals: int = 2, beyond: int = 0, seconds: float = 180
) -> optuna.trial.FrozenTrial:
    """A running trial with a checkpoint after ``min_evals`` evaluations (a retry: after step ``beyond``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for t in _trials(storage):
            if (
                t.state == TrialState.RUNNING
                and len(t.intermediate_values) >= min_evals
                and (t.user_attrs.get("retry_of") is None or max(t.intermediate_values) > beyond)
                and (checkpoints / f"trial-{t.number}" / "resume.pt").exists()
            ):
                return t
        time.sleep(0.05)
    raise AssertionError("no trial reached its checkpoint in time")


def _uninterrupted_curve(config: Path, params: dict, threads: int) -> dict[int, float]:
    """The dev curve (step -> objective metric) that a run of ``params`` computes when nothing stops it."""
    import torch

    from llmflow_hpo.config.study import load_study_config
    from llmflow_hpo.data.features import prepare_features
    from llmflow_hpo.recipe.train import train_and_evaluate

    cfg = load_study_config(config)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # CPU reductions depend on it: as the trial ran
    try:
        result = train_and_evaluate(cfg, params, prepare_features(cfg, log=lambda _: None), seed=cfg.seed)
    finally:
        torch.set_num_threads(before)
    return {e.step: e.metrics[cfg.metric] for e in result.history}


@pytest.mark.parametrize("storage_url", ["sqlite"], indirect=True)  # resuming from PostgreSQL: the signal test
def test_a_worker_killed_again_and_again_resumes_its_trial_each_time(write_study, tmp_path, storage_url):
    # The dev loss, not F1: a tiny model's F1 stays 0 for several evaluations, which any resume would match.
    config = write_study(
        {**SLOW_TRIALS, "storage": storage_url, "objective": {"metric": "loss", "direction": "minimize"}}
    )
    checkpoints = tmp_path / "checkpoints" / "tiny-ner"
    killed = []
    for _ in range(3):
        proc = start("search", str(config))
        beyond = max(killed[-1].intermediate_values) if killed else 0
        trial = _wait_for_running_trial(storage_url, checkpoints, beyond=beyond)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        killed.append(trial)
    final = cli("search", str(config))
    assert final.returncode == 0, final.stderr

    trials = {t.number: t for t in _trials(storage_url)}
    finished = [t for t in trials.values() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 2
    assert not [t for t in trials.values() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    threads = finished[0].user_attrs["torch_threads"]
    for dead in killed:
        assert trials[dead.number].state == TrialState.FAIL
        retry = next(t for t in trials.values() if t.user_attrs.get("retry_of") == dead.number)
        assert retry.params == dead.params
        # It resumed from the checkpoint of the killed attempt (written after its last or
        # second-to-last evaluation), not from step 0 ...
        steps = sorted(dead.intermediate_values)
        assert retry.user_attrs["resumed_at_step"] in steps[-2:] and retry.user_attrs["resumed_at_step"] > 0
        # ... and its learning curve continues the killed attempt's: the values up to the checkpoint are
        # inherited, so what shows the resume is right is that the values it computed after it are those
        # of a run that was never stopped.
        assert {s: v for s, v in retry.intermediate_values.items() if s in steps} == dead.intermediate_values
        assert max(retry.intermediate_values) > max(steps)
        whole = _uninterrupted_curve(config, dead.params, threads)
        assert retry.intermediate_values == pytest.approx({s: whole[s] for s in retry.intermediate_values}, rel=1e-6)
    # Only the kept best checkpoints remain: no resume states, no pruned or failed trials' folders.
    assert not list(checkpoints.glob("*/resume.pt"))
    assert len(list(checkpoints.glob("*/best.safetensors"))) <= 2


def test_search_with_workers_shares_the_study_and_counts_exactly(write_study, tmp_path):
    config = write_study({"n_trials": 5, "heartbeat": {"interval": 1, "grace_period": 2}})
    storage = f"sqlite:///{tmp_path / 'tiny-ner.db'}"
    run = cli("search", str(config), "--workers", "2", "--json")
    assert run.returncode == 0, run.stderr
    assert "worker 0: cores" in run.stderr and "[w0] " in run.stderr and "[w1] " in run.stderr
    assert "Traceback" not in run.stderr
    summary = json.loads(run.stdout)
    assert summary["workers"] == 2 and summary["ran"] == 5
    trials = _trials(storage)
    assert len(trials) == 5 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.params["learning_rate"] for t in trials}) == 5
    # Each worker trained with its share of the cores (one thread each on a 2-core machine).
    cores = len(os.sched_getaffinity(0))
    assert {t.user_attrs["torch_threads"] for t in trials} == {max(1, cores // 2)}


@pytest.mark.parametrize(
    ("backend", "signum"),
    [("postgresql", signal.SIGTERM)],
    ids=["postgresql-SIGTERM"],
)
def test_a_signal_exits_128_plus_it_and_the_next_search_resumes_the_trial(
    request, write_study, tmp_path, backend, signum
):
    # SIGINT on SQLite, and its retry: tests/test_cli_e2e.py. Both signals take the same handler, so each storage gets one.
    url = f"sqlite:///{tmp_path / 'study.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    config = write_study({**SLOW_TRIALS, "n_trials": 2, "storage": url})
    proc = start("search", str(config))
    running = _wait_for_running_trial(url, tmp_path / "checkpoints" / "tiny-ner", min_evals=1)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    trials = {t.number: t for t in _trials(url)}
    assert trials[running.number].state == TrialState.FAIL
    assert trials[running.number].user_attrs["fail_reason"] == f"interrupted ({signal.Signals(signum).name})"
    queued = [t for t in trials.values() if t.state == TrialState.WAITING]
    assert len(queued) == 1 and queued[0].params == running.params  # queued again, same parameters
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]

    again = cli("search", str(config))
    assert again.returncode == 0, again.stderr
    trials = {t.number: t for t in _trials(url)}
    retry = next(t for t in trials.values() if t.user_attrs.get("retry_of") == running.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_at_step"] > 0
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == 2


GRID_SPACE = {
    "learning_rate": {"type": "float", "low": 1e-3, "high": 2e-3, "step": 1e-3},
    "batch_size": {"type": "categorical", "choices": [8, 16]},
}


def test_a_grid_study_ends_when_its_grid_is_done_and_a_rerun_runs_nothing(write_study, tmp_path):
    # The worker loop tells its trials outside Study.optimize, where GridSampler's study.stop() raised
    # RuntimeError after the last point: every search with n_trials above the grid's size crashed.
    config = write_study(
        {"n_trials": 6, "sampler": {"name": "grid"}, "train": {"epochs": 1}, "checkpoint": {"enabled": False}},
        space=GRID_SPACE,
    )
    storage = f"sqlite:///{tmp_path / 'tiny-ner.db'}"
    run = cli("search", str(config), "--json")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "study tiny-ner: the grid has 4 point(s); the study ends when each has run" in run.stderr
    assert run.stderr.count("the grid is done, each of its 4 point(s) has run") == 1
    summary = json.loads(run.stdout)
    assert summary["ran"] == 4 and summary["target"] == 4 and summary["counts"]["complete"] == 4
    points = {(round(t.params["learning_rate"], 9), t.params["batch_size"]) for t in _trials(storage)}
    assert points == {(lr, bs) for lr in (0.001, 0.002) for bs in (8, 16)}

    again = cli("search", str(config), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["ran"] == 0
    assert "the grid is done, each of its 4 point(s) has run; nothing to run" in again.stderr
    assert len(_trials(storage)) == 4


def test_worker_joins_a_study_with_its_stored_config(write_study, tmp_path):
    config = write_study({"n_trials": 1})
    storage = f"sqlite:///{tmp_path / 'tiny-ner.db'}"
    assert cli("search", str(config)).returncode == 0
    joined = cli("worker", "--study", "tiny-ner", "--storage", storage, "--set", "n_trials=2", "--json")
    assert joined.returncode == 0, joined.stderr
    assert json.loads(joined.stdout)["ran"] == 1
    assert len([t for t in _trials(storage) if t.state == TrialState.COMPLETE]) == 2

    refused = cli("worker", "--study", "tiny-ner", "--storage", storage, "--set", "train.epochs=9")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "worker --set train.epochs=9" in refused.stderr and "Traceback" not in refused.stderr
    missing = cli("worker", "--study", "nope", "--storage", storage)
    assert missing.returncode == 1 and "no study 'nope'" in missing.stderr


def test_a_rerun_with_another_config_is_refused_and_changes_nothing(tiny_cfg, storage_url):
    from llmflow_hpo.errors import StorageError
    from llmflow_hpo.search.backends import run_search

    quiet = {"log": lambda _: None}
    cfg, space, raw = tiny_cfg({"n_trials": 1, "storage": storage_url, "train": {"epochs": 1}})
    run_search(cfg, space, raw, **quiet)
    before = [(t.number, t.state, t.value, t.params) for t in _trials(storage_url)]
    other_data, space2, raw2 = tiny_cfg({"n_trials": 2, "storage": storage_url, "data": {"limit_train": 40}})
    with pytest.raises(StorageError, match=r"data\.limit_train: 48 -> 40"):
        run_search(other_data, space2, raw2, **quiet)
    other_space = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}}
    other, space3, raw3 = tiny_cfg({"n_trials": 2, "storage": storage_url, "train": {"epochs": 1}}, space=other_space)
    with pytest.raises(StorageError, match="search_space"):
        run_search(other, space3, raw3, **quiet)
    assert [(t.number, t.state, t.value, t.params) for t in _trials(storage_url)] == before
    # Asked for explicitly, the changed search space gets a study of its own beside the stored one.
    assert run_search(other, space3, raw3, new_study=True, **quiet).study_name == "tiny-ner-2"
    assert [(t.number, t.state, t.value, t.params) for t in _trials(storage_url)] == before
