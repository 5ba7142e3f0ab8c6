"""Padding on conll-small: pad-to-128 against dynamic padding, with and without length-grouped batches.

    .venv/bin/python benchmarks/padding.py --smoke                                  # seconds: tiny model, CI
    .venv/bin/python benchmarks/padding.py --out benchmarks/results/padding.json     # the real run (~30 min on 2 cores)

One fine-tune per variant, all with llmflow-hpo's own loop (``train_and_evaluate``) and the plain
fine-tune's settings (lr 5e-5, batch 16, 3 epochs, linear schedule, no warmup, seed 42), on the
conll-small slice (first 2,000 train / 500 valid sentences of CoNLL-2003, all-MiniLM-L6-v2):

* ``pad-128``: the common recipe: every sentence padded to max_length=128
  (``DataCollatorForTokenClassification(padding="max_length", max_length=128)``), batches drawn
  uniformly at random; its dev evaluations padded the same way.
* ``dynamic``: padded to the longest sentence of each batch, batches drawn uniformly at random.
* ``dynamic+grouped``: dynamic padding and length-grouped batches (llmflow-hpo's default).

Only the batching differs. Reported per variant: training examples per second (training steps only,
the loop's ``examples_per_second``), seconds of training and of dev evaluation, dev entity F1 after
each epoch, and the speed-up of each over ``pad-128``. The same seed does not give the same batches
across variants (grouping reorders them), so the F1s differ by training noise; the epoch-by-epoch
figures show how large that is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from peers import FULL, SMOKE, machine, say, study_dict  # noqa: E402

VARIANTS = ("pad-128", "dynamic", "dynamic+grouped")


def run_variant(name: str, protocol: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from llmflow_hpo.config.study import config_from_dict
    from llmflow_hpo.data.features import prepare_features
    from llmflow_hpo.recipe import train
    from llmflow_hpo.tasks import IGNORE_INDEX, get_task

    raw = study_dict(protocol, workdir)
    raw["search_space"] = str(workdir / "space.yaml")
    raw["cache_dir"] = str(workdir / "cache")
    raw["train"].update(
        learning_rate=protocol["plain"]["learning_rate"],
        batch_size=16,
        evals_per_epoch=1,
        early_stopping_patience=None,
        group_by_length=name == "dynamic+grouped",
    )
    cfg = config_from_dict(raw, source="benchmarks/padding.py")
    features = prepare_features(cfg, log=lambda _: None)
    task = get_task(cfg.task)

    def pad_to_max_length(tokenizer: Any, data: Any = None) -> Any:
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(
            tokenizer, padding="max_length", max_length=cfg.data.max_length, label_pad_token_id=IGNORE_INDEX
        )

    if name == "pad-128":
        task.collator = pad_to_max_length  # type: ignore[method-assign]  # this variant's loaders pad to max_length
    try:
        start = time.perf_counter()
        result = train.train_and_evaluate(cfg, {}, features, seed=42)
        wall = time.perf_counter() - start
    finally:
        vars(task).pop("collator", None)  # the task's own collator again
    evaluations = [{"epoch": e.epoch, "dev_f1": e.metrics["f1"], "train_loss": e.train_loss} for e in result.history]
    say(
        f"{name}: {result.examples_per_second:.1f} examples/s, dev F1 by epoch "
        + ", ".join(f"{e['dev_f1']:.4f}" for e in evaluations)
    )
    return {
        "examples_per_second": round(result.examples_per_second, 2),
        "train_s": round(result.train_seconds, 2),
        "eval_s": round(result.eval_seconds, 2),
        "wall_s": round(wall, 2),
        "final_dev_f1": evaluations[-1]["dev_f1"],
        "best_dev_f1": max(e["dev_f1"] for e in evaluations),
        "evaluations": evaluations,
        "settings": dataclasses.asdict(cfg.train),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, quick-start sample: checks the script runs")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmflow-padding"))
    parser.add_argument("--out", type=Path, help="JSON result")
    args = parser.parse_args()
    protocol = SMOKE if args.smoke else FULL
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "space.yaml").write_text("{}\n")
    results = {name: run_variant(name, protocol, args.workdir) for name in VARIANTS}
    base = results["pad-128"]["examples_per_second"]
    for r in results.values():
        r["speedup_vs_pad_128"] = round(r["examples_per_second"] / base, 3)
    report = {"protocol": protocol["name"], "machine": machine(), "date": time.strftime("%Y-%m-%d"), "results": results}
    lines = [
        "| batching | examples/s (training) | speed-up vs pad-128 | train s | dev eval s | dev F1 by epoch | final dev F1 |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, r in results.items():
        by_epoch = ", ".join(f"{e['dev_f1']:.3f}" for e in r["evaluations"])
        lines.append(
            f"| {name} | {r['examples_per_second']:.1f} | {r['speedup_vs_pad_128']:.2f} x | {r['train_s']:.0f} | "
            f"{r['eval_s']:.0f} | {by_epoch} | {r['final_dev_f1']:.4f} |"
        )
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
