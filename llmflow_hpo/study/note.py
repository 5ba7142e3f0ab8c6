"""The study note: the Markdown a study carries as its optuna-dashboard note (the Note panel of its page).

Written by ``storage.open_study`` where a study has none: what the study searches (task, model, data,
objective, sampler and pruner or scheduler, the search space, the fixed settings), the unit of its
curves and what each user attribute holds (from ``records``). A note the user edited stays.
``write_confirmation_note`` (``llmflow-hpo confirm``) adds or replaces the note's last section, the
confirmation table; the rest of the note stays as it is. ``write_front_note`` (after each ``search`` of a
quality-against-cost study) adds or replaces the section of its Pareto front in the same way.
"""

from __future__ import annotations

import json
from typing import Any

import optuna

from llmflow_hpo import __version__
from llmflow_hpo.config.study import StudyConfig, config_to_dict
from llmflow_hpo.study import records
from llmflow_hpo.study.provenance import library_versions

__all__ = [
    "CONFIRMATION_HEADING",
    "FRONT_HEADING",
    "confirmation_note",
    "front_note",
    "study_note",
    "write_confirmation_note",
    "write_front_note",
    "write_study_note",
]

# The heading of the confirmation section: everything from it to the end of the note is rewritten by each confirm.
CONFIRMATION_HEADING = "### Confirmation over seeds (llmflow-hpo confirm)"
# The heading of a quality-against-cost study's front section, rewritten after each search.
FRONT_HEADING = "### Pareto front (metric against cost)"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string: show the number
        try:
            return f"{float(value):g}"
        except ValueError:
            return value
    return json.dumps(value)


def _space_rows(space_raw: dict[str, Any]) -> list[str]:
    rows = ["| parameter | type | range or choices | scale |", "|---|---|---|---|"]
    for name, spec in space_raw.items():
        kind = spec.get("type")
        if kind == "categorical":
            values, scale = ", ".join(_num(c) if c is not None else "null" for c in spec["choices"]), "-"
        else:
            values = f"{_num(spec['low'])} to {_num(spec['high'])}"
            scale = "log" if spec.get("log") else "linear"
            if spec.get("step") is not None:
                scale += f", step {_num(spec['step'])}"
        rows.append(f"| `{name}` | {kind} | {values} | {scale} |")
    return rows


def _model_line(cfg: StudyConfig) -> str:
    model = cfg.model
    line = f"`{model.name_or_path}`" + (
        " with random initial weights (`random_init: true`)" if model.random_init else ", pretrained weights"
    )
    if model.config_overrides:
        line += f"; config overrides `{json.dumps(model.config_overrides, sort_keys=True)}`"
    return line


def _file_lines(cfg: StudyConfig) -> list[str]:
    data = cfg.data
    files = []
    for split in ("train", "dev", "test"):
        path, limit = getattr(data, split), getattr(data, f"limit_{split}")
        if path is not None:
            files.append(f"- {split}: `{path}`" + (f" (first {limit} examples)" if limit is not None else ""))
        else:
            amount = getattr(data, f"{split}_split")
            share = f"{amount * 100:g}%" if isinstance(amount, float) else f"{amount} examples"
            files.append(f"- {split}: no file, {share} held out of train")
    return files


def _search_line(cfg: StudyConfig) -> str:
    if cfg.backend == "ray":
        stopping = f"Ray Tune's `{cfg.ray.scheduler}` scheduler" + (
            f" `{json.dumps(cfg.ray.scheduler_options, sort_keys=True)}`" if cfg.ray.scheduler_options else ""
        )
    else:
        stopping = f"`{cfg.pruner.name}`" + (
            f" `{json.dumps(cfg.pruner.options, sort_keys=True)}`" if cfg.pruner.options else ""
        )
    sampler = f"`{cfg.sampler.name}`" + (
        f" `{json.dumps(cfg.sampler.options, sort_keys=True)}`" if cfg.sampler.options else ""
    )
    budget = f"{cfg.n_trials} finished (complete or pruned) trials" if cfg.n_trials is not None else "no trial limit"
    if cfg.timeout is not None:
        budget += f", no new trial after {cfg.timeout:g} s"
    if cfg.budget is not None:
        budget += f", within a budget of {cfg.budget} per search run"
    return f"**Search**: {sampler} sampler (seed {cfg.seed}), stopping by {stopping} (backend {cfg.backend}); {budget}."


def _attribute_lines(cfg: StudyConfig) -> list[str]:
    """What each user attribute holds, from ``records``: a line per group of trial attributes, then the study's."""
    lines = ["- **User attributes** of a trial:"]
    for group in records.TRIAL_GROUPS:
        if group.note is None or (group.ray_only and cfg.backend != "ray"):
            continue
        names = ", ".join(f"`{a.name}`" for a in group.attrs)
        lines.append(f"  - {names}: {group.note.format(metric=cfg.metric)}")
    study = ", ".join(
        f"`{a.name}`" + (f" ({a.help})" if a.name == records.CONFIG else "")
        for a in records.STUDY_ATTRS
        if a.name != records.MLFLOW  # only with MLflow tracking, and not needed to retrain
    )
    lines.append(
        f"- **Study user attributes**: {study}; `llmflow-hpo retrain-best` needs only them and the best trial."
    )
    return lines


def study_note(cfg: StudyConfig, space_raw: dict[str, Any], data_report: list[str]) -> str:
    """The study's note in optuna-dashboard (Markdown): what was searched, on which data and model, and how
    to read the trials' curves and user attributes."""
    raw = config_to_dict(cfg)
    fixed = ", ".join(f"{k}={_num(v)}" for k, v in raw["train"].items() if k not in space_raw)
    versions = library_versions()
    lines = [
        f"## {cfg.study_name}: {cfg.task}",
        "",
        f"**Objective**: {cfg.direction} the dev `{cfg.metric}` of each trial's best evaluation.  ",
        *_cost_lines(cfg),
        f"**Model**: {_model_line(cfg)}.  ",
        _search_line(cfg),
        "",
        "### Data",
        "",
        f"Format `{cfg.data.format}`, max_length {cfg.data.max_length} subword tokens; files:",
        "",
        *_file_lines(cfg),
        "",
        "As read (the study's `data_report`):",
        "",
        *(f"- {line}" for line in data_report),
        "",
        "### Search space",
        "",
        *_space_rows(space_raw),
        "",
        f"Fixed training settings (not searched): {fixed}.",
        "",
        "### Reading the trials",
        "",
        f"- **Learning curves**: intermediate values are the dev `{cfg.metric}` at a step counted in training "
        "examples seen, the same unit for every trial (trials with different batch sizes are compared at "
        "equal data seen; one epoch is as many steps as the train split has examples); "
        f"{cfg.train.evals_per_epoch} evaluation(s) per epoch. The {'scheduler' if cfg.backend == 'ray' else 'pruner'} "
        "compares trials at the same step.",
        f"- **Value**: the dev `{cfg.metric}` of the trial's best evaluation (not the last one).",
        *_attribute_lines(cfg),
        "",
        f"Written by llmflow-hpo {__version__} (optuna {versions['optuna']}, torch {versions['torch']}, "
        f"transformers {versions['transformers']}).",
    ]
    return "\n".join(lines) + "\n"


def _cost_lines(cfg: StudyConfig) -> list[str]:
    """A quality-against-cost study's second objective, its constraint and its select rule (none otherwise)."""
    from llmflow_hpo.study.front import CostObjective

    o = CostObjective.of_config(cfg)
    if o is None:
        return []
    limit = f"at most {o.max_cost:g} (a trial above it is infeasible)" if o.max_cost is not None else "no constraint"
    return [
        f"**Cost**: minimize `{o.cost}` against it, {limit}; each trial's second value. The dashboard's Pareto-front "
        f"plot shows both; `retrain-best` trains the trial objective.select `{o.rule}` picks (see the front below, "
        "written after each search).  "
    ]


def front_note(view: Any) -> str:
    """The front section of the note (Markdown; ``view``: a ``study.view.StudyView`` of a cost study)."""
    from llmflow_hpo.study.front import cost_value, metric_value
    from llmflow_hpo.study.view import params_text

    o, picked = view.objective, view.best
    lines = [
        FRONT_HEADING,
        "",
        f"The complete trials no other beats on both dev `{view.metric}` and `{o.cost}`, cheapest first.",
        "",
        f"| trial | {view.metric} | {o.cost} | n_params | within max_cost | parameters |",
        "|---|---|---|---|---|---|",
    ]
    for t in view.front:
        mark = " **(picked)**" if picked is not None and t.number == picked.number else ""
        lines.append(
            f"| {t.number}{mark} | {metric_value(t):.4f} | {cost_value(t):.4g} | "
            f"{t.user_attrs.get(records.N_PARAMS, '-')} | {'yes' if o.feasible(t) else 'no'} | {params_text(t.params)} |"
        )
    lines.append("")
    lines.append(
        f"Picked by objective.select `{o.rule}`: trial {picked.number}, the one `llmflow-hpo retrain-best` trains."
        if picked is not None
        else "No complete trial is within max_cost yet."
    )
    return "\n".join(lines) + "\n"


def write_front_note(study: optuna.Study, view: Any) -> None:
    """Add or replace the front section of the study's note, in place (a cost study has no confirmation
    section: ``llmflow-hpo confirm`` refuses it)."""
    from optuna_dashboard import get_note, save_note

    note, section = get_note(study), front_note(view)
    if FRONT_HEADING in note:
        before, rest = note.split(FRONT_HEADING, 1)
        after = rest.split("\n### ", 1)
        note = before + section.rstrip("\n") + ("\n\n### " + after[1] if len(after) > 1 else "\n")
    else:
        note = note.rstrip("\n") + "\n\n" + section
    save_note(study, note)


def write_study_note(study: optuna.Study, cfg: StudyConfig, space_raw: dict[str, Any], data_report: list[str]) -> None:
    """Write the study note unless the study has one (a note the user edited in the dashboard stays)."""
    from optuna_dashboard import get_note, save_note

    if not get_note(study).strip():
        save_note(study, study_note(cfg, space_raw, data_report))


def confirmation_note(summary: dict[str, Any], metric: str) -> str:
    """The confirmation section of the note (Markdown; ``summary``: ``study.view.confirmation_summary``)."""
    from llmflow_hpo.study.view import format_value, mean_std_text, params_text

    def num(value: Any) -> str:
        return format_value(value) if value is not None else "-"

    lines = [
        CONFIRMATION_HEADING,
        "",
        f"Seeds {', '.join(map(str, summary['seeds']))} per configuration (the search's own seed left out); a seed's "
        f"score is its best dev `{metric}`; value = `{summary['select']}`.",
        "",
        "| trial | confirms | single run | state | scores by seed | mean | std | lcb | parameters |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        scores = ", ".join(f"{score:.4f}" for score in r["scores"]) or "-"
        mark = " **(winner)**" if r["winner"] else ""
        lines.append(
            f"| {r['trial']}{mark} | {r['confirms']} | {num(r['single_run_value'])} | {r['state']} | {scores} | "
            f"{num(r['mean'])} | {num(r['std'])} | {num(r['lcb'])} | {params_text(r['params'])} |"
        )
    won, single = summary["winner"], summary["single_run"]
    lines.append("")
    if won is None:
        lines.append("No configuration is confirmed completely yet.")
    else:
        line = f"**Confirmed winner**: trial {won['trial']} (search trial {won['confirms']}), {mean_std_text(won, metric)}."
        if single is not None:
            other = "another configuration" if summary["differs"] else "the same configuration"
            line += f" The single-run winner, search trial {single['trial']}, is {other}."
        lines.append(line + " `llmflow-hpo retrain-best` trains the confirmed winner.")
    return "\n".join(lines) + "\n"


def write_confirmation_note(study: optuna.Study, summary: dict[str, Any], metric: str) -> None:
    """Add (or replace) the confirmation section at the end of the study's note; what comes before it stays."""
    from optuna_dashboard import get_note, save_note

    kept = get_note(study).split(CONFIRMATION_HEADING, 1)[0].rstrip("\n")
    save_note(study, (kept + "\n\n" if kept else "") + confirmation_note(summary, metric))
