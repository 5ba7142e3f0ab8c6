"""GPU check: the same code on a CUDA device, with GPU memory read after every trial.

Runs the quick-start study on the GPU (``train.device: auto`` picks CUDA) with a randomly initialised
model of the full all-MiniLM-L6-v2 size, records ``torch.cuda.memory_allocated`` after each of N
trials (it must come back to where it started: nothing carried from trial to trial), the trials'
throughput and peak memory, and whether ``retrain-best`` reproduces the best trial's dev score there.

    python benchmarks/gpu_check.py --trials 10 --out gpu_check.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import optuna
    import torch
    import transformers

    from llmflow_hpo.config.study import load_study_config
    from llmflow_hpo.data.features import prepare_features
    from llmflow_hpo.deliver.retrain import retrain_best
    from llmflow_hpo.search.objective import Objective
    from llmflow_hpo.search.spaces import load_search_space
    from llmflow_hpo.search.strategy import build_pruner, build_sampler
    from llmflow_hpo.study.storage import open_study

    transformers.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="llmflow-gpu-"))
    cfg = load_study_config(
        REPO / "studies" / "quickstart.yaml",
        [
            "model.random_init=true",
            f"storage=sqlite:///{tmp / 'gpu.db'}",
            f"cache_dir={tmp / 'cache'}",
            f"n_trials={args.trials}",
            "pruner.name=none",
            "pruner.options={}",
            f"train.epochs={args.epochs}",
        ],
    )
    space, space_raw = load_search_space(cfg.search_space)
    features = prepare_features(cfg, log=lambda line: print(line, file=sys.stderr))
    study = open_study(cfg, space_raw, sampler=build_sampler(cfg, space), pruner=build_pruner(cfg), data_report=[])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a dry run of this script

    def allocated() -> int:
        if device.type != "cuda":
            return 0
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(device)

    baseline = allocated()
    rows = []

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        gc.collect()
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                "value": trial.value,
                "device": trial.user_attrs.get("device"),
                "examples_per_second": trial.user_attrs.get("examples_per_second"),
                "peak_memory_mb": trial.user_attrs.get("peak_memory_mb"),
                "allocated_after_mb": (allocated() - baseline) / 2**20,
                "seconds": trial.duration.total_seconds() if trial.duration else None,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    start = time.perf_counter()
    study.optimize(Objective(cfg, space, features), n_trials=args.trials, callbacks=[after_trial])
    search_s = time.perf_counter() - start
    retrain = retrain_best(study_name=cfg.study_name, storage=cfg.storage, output_dir=tmp / "model", log=lambda _: None)
    summary = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (cpu dry run)",
        "trials": rows,
        "search_seconds": round(search_s, 1),
        "allocated_after_each_trial_mb": [round(r["allocated_after_mb"], 2) for r in rows],
        "best_trial": study.best_trial.number,
        "best_dev_f1": study.best_value,
        "retrain_dev_f1": retrain.dev_metrics["f1"],
        "retrain_reproduced_exactly": retrain.reproduced,
        "retrain_test_f1": retrain.test_metrics["f1"],
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
