"""The finished model folder: weights (safetensors), tokenizer, label map, metrics, config and a model card.

A LoRA model (``train.adapter: lora``) is written as its adapter (PEFT's ``adapter_config.json`` and
``adapter_model.safetensors``: the adapter and the trained head) and, with ``merge``, also as the base model with
the adapter merged into its weights (``merged/``, PEFT's ``merge_and_unload``), which loads without PEFT.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from llmflow_hpo import __version__
from llmflow_hpo.config.study import StudyConfig, config_to_dict
from llmflow_hpo.errors import LlmflowError
from llmflow_hpo.recipe.adapters import adapter_settings, is_adapter
from llmflow_hpo.recipe.models import load_tokenizer
from llmflow_hpo.study import records
from llmflow_hpo.study.front import CostObjective, cost_value, metric_value
from llmflow_hpo.study.provenance import library_versions
from llmflow_hpo.tasks import get_task

__all__ = ["check_output_dir", "save_model"]


def _fmt(metrics: dict[str, float]) -> str:
    return "\n".join(f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items()))


def _card(
    cfg: StudyConfig,
    study: Any,
    n_trials: int,
    trial: Any,
    params: dict[str, Any],
    train_on: str,
    dev: dict,
    test: dict,
    reproduced: bool | None,
    confirmation: dict[str, Any] | None = None,
    adapter: dict[str, Any] | None = None,
) -> str:
    rows = "\n".join(f"| {name} | {value!r} |" for name, value in sorted(params.items()))
    fixed = {k: v for k, v in config_to_dict(cfg)["train"].items() if k not in params}
    fixed_rows = "\n".join(f"| {name} | {value!r} |" for name, value in sorted(fixed.items()))
    repro = {
        True: "yes: the retrained weights and dev score equal the trial's",
        False: "NO: the retrained weights or dev score differ",
        None: "n/a (dev was trained on)",
    }[reproduced]
    data = cfg.data
    auto = get_task(cfg.task).model_card_class
    return f"""# {cfg.study_name}: best trial {trial.number}

Fine-tuned `{cfg.model.name_or_path}`{f" (`{cfg.model.gguf_file}`)" if cfg.model.gguf_file else ""} for **{cfg.task}** by llmflow-hpo {__version__}.

- Study: `{study.study_name}` ({n_trials} trials), objective dev `{cfg.metric}` ({cfg.direction})
- Best trial: {trial.number}, dev {cfg.metric} = {metric_value(trial):.4f} at {trial.user_attrs.get(records.BEST_STEP)} training examples seen
{_cost_line(cfg, trial)}{_confirmed_line(confirmation)}- Retrained on: {train_on}; reproduced the trial: {repro}
- Data: format {data.format}; train `{data.train}`; dev `{data.dev or "held out of train"}`; test `{data.test or "held out of train"}`
  (limits: train {data.limit_train}, dev {data.limit_dev}, test {data.limit_test}; max_length {data.max_length})

## Scores

Test:

| metric | value |
|---|---|
{_fmt(test)}

Dev:

| metric | value |
|---|---|
{_fmt(dev)}

## Hyperparameters

Searched (best trial's values):

| parameter | value |
|---|---|
{rows}

Fixed:

| setting | value |
|---|---|
{fixed_rows}

## Use

{_use(auto, adapter)}"""


def _use(auto: str, adapter: dict[str, Any] | None) -> str:
    """The card's usage snippet: transformers' Auto class, or PEFT's for an adapter (and the merged folder)."""
    if adapter is None:
        return f"""```python
from transformers import {auto}, AutoTokenizer
model = {auto}.from_pretrained("PATH/TO/THIS/FOLDER")
tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")
```
"""
    lora = adapter["lora"]
    settings = ", ".join(f"{k} {v}" for k, v in lora.items())
    merged = (
        f"""
The adapter merged into the base weights (loads without PEFT):

```python
model = {auto}.from_pretrained("PATH/TO/THIS/FOLDER/merged")
```
"""
        if adapter["merged"]
        else ""
    )
    return f"""A LoRA adapter ({settings}; {adapter["adapter_bytes"] / 1e6:.2f} MB) on the base model named in
adapter_config.json:

```python
from peft import AutoPeftModel{auto.removeprefix("AutoModel")}
from transformers import AutoTokenizer
model = AutoPeftModel{auto.removeprefix("AutoModel")}.from_pretrained("PATH/TO/THIS/FOLDER")
tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")
```
{merged}"""


def _confirmed_line(confirmation: dict[str, Any] | None) -> str:
    """The model card's line on the confirmation stage: the configuration's mean +- std over seeds."""
    if confirmation is None:
        return ""
    from llmflow_hpo.study.view import mean_std_text

    return (
        f"- Confirmed winner (`llmflow-hpo confirm`, selected by {confirmation['select']}): {mean_std_text(confirmation, confirmation['metric'])}; "
        f"confirmation trial {confirmation['trial']} of this configuration (the best trial's single run above "
        "is one optimistic draw)\n"
    )


def _cost_line(cfg: StudyConfig, trial: Any) -> str:
    """The model card's line on a quality-against-cost study: the trial's cost and the rule that picked it."""
    o = CostObjective.of_config(cfg)
    if o is None:
        return ""
    limit = f", among the trials within max_cost {o.max_cost:g}" if o.max_cost is not None else ""
    where = f" on {trial.user_attrs.get(records.DEVICE)}" if o.cost != "params" else ""
    return (
        f"- Cost: {o.cost} = {cost_value(trial):.4g}{where}; the trial was picked from the Pareto front of dev "
        f"{cfg.metric} against {o.cost} by objective.select {o.rule}{limit}\n"
    )


def _save_weights(model: Any, folder: Path, tokenizer: Any, hp: Any, merge: bool) -> dict[str, Any] | None:
    """The model's weights into ``folder``: all of them, or a LoRA model's adapter (and, with ``merge``, the
    merged model in ``merged/``); for an adapter, what the model card and metrics.json say of it."""
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True  # trained without the key-value cache (packing); inference wants it
    model.save_pretrained(folder, safe_serialization=True)  # PEFT writes an adapter's files, transformers a model's
    if not is_adapter(model):
        return None
    adapter_bytes = (folder / "adapter_model.safetensors").stat().st_size
    info: dict[str, Any] = {"lora": adapter_settings(hp), "adapter_bytes": adapter_bytes, "merged": None}
    if merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(folder / "merged", safe_serialization=True)
        tokenizer.save_pretrained(folder / "merged")
        info["merged"] = "merged"
        info["merged_bytes"] = sum(f.stat().st_size for f in (folder / "merged").glob("*.safetensors"))
    return info


def check_output_dir(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier llmflow-hpo model (nothing of the user's is lost)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "metrics.json").exists())):
        raise LlmflowError(f"--output {out}: exists and is not an llmflow-hpo model folder; choose another folder")


def save_model(
    out: Path,
    *,
    model: Any,
    cfg: StudyConfig,
    space_raw: dict[str, Any],
    study: Any,
    n_trials: int,
    trial: Any,
    params: dict[str, Any],
    seed: int,
    train_on: str,
    dev_metrics: dict[str, float],
    test_metrics: dict[str, float],
    reproduced: bool | None,
    examples_seen: int,
    weights_sha256: dict[str, str | None] | None = None,
    confirmation: dict[str, Any] | None = None,
    merge: bool = False,
    test_samples: list[dict[str, str]] | None = None,
) -> None:
    """Write the folder next to ``out`` first, then move it in place: a failed export leaves no half folder."""
    check_output_dir(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer = load_tokenizer(cfg.model)
    adapter = _save_weights(model, staging, tokenizer, cfg.train.with_params(params), merge)
    tokenizer.save_pretrained(staging)
    if get_task(cfg.task).labelled:
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        (staging / "labels.json").write_text(
            json.dumps({"labels": labels, "label2id": {label: i for i, label in enumerate(labels)}}, indent=2)
        )
    metrics = {
        "study": study.study_name,
        "trial": trial.number,
        "metric": cfg.metric,
        "direction": cfg.direction,
        "trial_dev_value": metric_value(trial),
        "trained_on": train_on,
        "reproduced_trial": reproduced,
        "weights_sha256": weights_sha256 or {},  # the model's, and the trial's best evaluation's
        "examples_seen": examples_seen,
        "seed": seed,
        "dev": dev_metrics,
        "test": test_metrics,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
    }
    if cfg.objective.cost is not None:  # a quality-against-cost study: the trial's cost and how it was picked
        metrics["cost"] = {"name": cfg.objective.cost, "value": cost_value(trial), "select": cfg.objective.select}
    if confirmation is not None:  # the confirmed winner (llmflow-hpo confirm): its scores over seeds
        metrics["confirmation"] = confirmation
    if adapter is not None:
        metrics["adapter"] = adapter
    if test_samples:
        metrics["test_samples"] = test_samples
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    resolved = {
        "config": config_to_dict(cfg),
        "search_space": space_raw,
        "best_params": params,
        "llmflow_hpo_version": __version__,
    }
    (staging / "study_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    (staging / "README.md").write_text(
        _card(
            cfg, study, n_trials, trial, params, train_on, dev_metrics, test_metrics, reproduced, confirmation, adapter
        )
    )
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
