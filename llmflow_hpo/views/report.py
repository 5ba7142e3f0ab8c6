"""A stored study as a report: one offline HTML page, its plots as PNG files, and summary.json for scripts.

The page needs no network: CSS inline, plots embedded as ``data:`` URIs. The plots are optuna's own
(``optuna.visualization.matplotlib``); a plot the study cannot support yet (importances from a single
trial, learning curves before any evaluation) is replaced by a line that says why. Parameter importances
use a fixed seed, so the same study gives the same report. Reads the storage only: no torch, no transformers.
"""

from __future__ import annotations

import base64
import html
import json
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmflow_hpo import __version__
from llmflow_hpo.errors import ConfigError, StorageError
from llmflow_hpo.study import records
from llmflow_hpo.study.front import CostObjective, cost_value, metric_value
from llmflow_hpo.study.view import (
    StudyView,
    complete_trials,
    confirmation_summary,
    duration_s,
    format_seconds,
    format_value,
    mean_std_text,
    ranked,
    search_trials,
    state_counts,
)

__all__ = ["IMPORTANCE_SEED", "PLOTS", "ReportSummary", "build_report", "default_report_dir"]

PLOTS = ("optimization_history", "intermediate_values", "param_importances", "parallel_coordinate", "slice")
FRONT_PLOT = "pareto_front"  # drawn for a quality-against-cost study only
IMPORTANCE_SEED = 0  # fANOVA's random forest: a fixed seed makes the importances (and the report) reproducible
TOP_TRIALS = 10
MAX_LEGEND = 20  # more curves than this: optuna's legend (one entry per trial) would dwarf the plot
DPI = 110
STATES = ("complete", "pruned", "fail", "running", "waiting")


@dataclass
class ReportSummary:
    """What a report shows, as data (written to summary.json)."""

    study_name: str
    storage: str | None
    direction: str
    metric: str
    output_dir: str
    index_html: str
    counts: dict[str, int]  # trials per state: complete, pruned, fail, running, waiting
    seconds: dict[str, dict[str, float | int | None]]  # per state: timed trials, total_s, mean_s
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    importances: dict[str, float]  # fANOVA, IMPORTANCE_SEED; empty when the plot was not drawn
    curves: dict[str, int]  # learning curves drawn in intermediate_values.png, per trial state
    plots: dict[str, str]  # plot name -> PNG file
    skipped: dict[str, str]  # plot name -> why it was not drawn
    files: list[str] = field(default_factory=list)
    llmflow_hpo_version: str = __version__
    confirmation: dict[str, Any] | None = None  # study.view.confirmation_summary; None without confirmation trials
    front: list[dict[str, Any]] | None = None  # a quality-against-cost study's Pareto front (_front_rows), else None


def default_report_dir(study_name: str) -> Path:
    """Where ``report --study NAME`` writes without ``--output`` (beside retrain-best's runs/NAME/best-model)."""
    return Path("runs") / study_name / "report"


def build_report(
    study: optuna.Study,
    output_dir: Path | str | None = None,
    *,
    storage: str | None = None,
    log: Callable[[str], None] | None = None,
) -> ReportSummary:
    """Write index.html, one PNG per drawable plot and summary.json into ``output_dir``; return the summary.

    ``output_dir`` defaults to runs/NAME/report; it must be missing, empty or an earlier report.
    ``storage`` is only shown (without its password).
    """
    say = log or (lambda line: print(line, file=sys.stderr))
    if len(study.directions) > 2:
        raise StorageError(
            f"study {study.study_name!r} has {len(study.directions)} objectives; reports show one, or a metric "
            "against a cost"
        )
    out = Path(output_dir) if output_dir is not None else default_report_dir(study.study_name)
    _prepare_dir(out)
    every = study.get_trials(deepcopy=False)
    trials = search_trials(every)  # the search's own; confirmation trials (llmflow-hpo confirm) have their table
    info = _StudyInfo.read(study, trials, storage)
    view = StudyView(info.direction, info.metric, tuple(every), objective=info.objective)
    info.confirmation = confirmation_summary(view)
    plots, skipped, curves, importances = _draw_plots(_search_only(study, trials, every), trials, info, out)
    for name, reason in skipped.items():
        say(f"report: {name} not drawn: {reason}")
    best = ranked(trials, info.direction)
    chosen = view.best  # the best trial; a cost study's: the one its select rule picks
    info.front = _front_rows(view) if info.objective is not None else None
    summary = ReportSummary(
        study_name=study.study_name,
        storage=info.storage,
        direction=info.direction,
        metric=info.metric,
        output_dir=str(out.resolve()),
        index_html=str((out / "index.html").resolve()),
        counts=info.counts,
        seconds=info.seconds,
        best_number=chosen.number if chosen else None,
        best_value=metric_value(chosen) if chosen else None,
        best_params=dict(chosen.params) if chosen else {},
        importances=importances,
        curves=curves,
        plots={name: f"{name}.png" for name in plots},
        skipped=skipped,
        files=["index.html", *(f"{name}.png" for name in plots), "summary.json"],
        confirmation=info.confirmation,
        front=info.front,
    )
    page = _page(study.study_name, info, trials, best, plots, skipped, curves, out)
    _write(out / "index.html", page)
    _write(out / "summary.json", json.dumps(asdict(summary), indent=2, default=str) + "\n")
    return summary


def _is_report(folder: Path) -> bool:
    """Whether the folder holds a report this command wrote (its summary.json says so)."""
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"llmflow_hpo_version", "study_name"} <= summary.keys()


def _prepare_dir(out: Path) -> None:
    """Create the folder; refuse a file, or a folder that holds something other than an earlier report."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out}: is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_report(out):
        raise ConfigError(f"--output {out}: exists and is not an llmflow-hpo report folder; choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in (*PLOTS, FRONT_PLOT):  # an earlier report's plot that this one cannot draw must not stay behind
            (out / f"{name}.png").unlink(missing_ok=True)
    except OSError as e:
        raise ConfigError(f"--output {out}: cannot write there ({e.strerror}); choose a writable folder") from None


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            f"--output {path.parent}: cannot write {path.name} ({e.strerror}); choose a writable folder"
        ) from None


# ----------------------------------------------------------------------------------------------------
# What the study holds.


@dataclass
class _StudyInfo:
    storage: str | None
    direction: str
    metric: str  # the objective's name: the study's metric name (dev_f1), else "value"
    config: Any  # the stored StudyConfig, or None for a study not made by llmflow-hpo
    versions: dict[str, str]
    counts: dict[str, int]
    seconds: dict[str, dict[str, float | int | None]]
    first_start: datetime | None
    last_complete: datetime | None
    confirmation: dict[str, Any] | None = None  # study.view.confirmation_summary
    objective: CostObjective | None = None  # a quality-against-cost study's cost (study.front)
    cost_name: str = "cost"  # the cost objective's name in the study (latency_ms, n_params, peak_memory_mb)
    front: list[dict[str, Any]] | None = None  # _front_rows

    @property
    def plot_names(self) -> tuple[str, ...]:
        """The plots this study's report draws: PLOTS, and the Pareto front of a quality-against-cost study."""
        return (*PLOTS, FRONT_PLOT) if self.objective is not None else PLOTS

    @classmethod
    def read(cls, study: optuna.Study, trials: list[FrozenTrial], storage: str | None) -> _StudyInfo:
        from llmflow_hpo.study.provenance import stored_config

        attrs = study.user_attrs  # a storage query and a deep copy: read once
        config = stored_config(study)[0] if records.CONFIG in attrs else None
        names = study.metric_names
        metric = names[0] if names else (records.dev(config.metric) if config is not None else "value")
        counts = state_counts(trials, STATES)
        durations: dict[str, list[float]] = {state: [] for state in STATES}
        now = datetime.now()
        for t in trials:
            state = t.state.name.lower()
            if t.datetime_start is not None:  # a running trial: the time it has taken so far
                end = t.datetime_complete or (now if t.state == TrialState.RUNNING else None)
                if end is not None:
                    durations[state].append((end - t.datetime_start).total_seconds())
        seconds: dict[str, dict[str, float | int | None]] = {
            state: {
                "timed": len(d),
                "total_s": round(sum(d), 3),
                "mean_s": round(sum(d) / len(d), 3) if d else None,
            }
            for state, d in durations.items()
        }
        starts = [t.datetime_start for t in trials if t.datetime_start is not None]
        ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
        return cls(
            storage=_hide_password(storage) if storage else None,
            direction=study.directions[0].name.lower(),  # the metric's (a cost study's second is the cost's)
            metric=metric,
            config=config,
            versions=dict(attrs.get(records.VERSIONS) or {}),
            counts=counts,
            seconds=seconds,
            first_start=min(starts) if starts else None,
            last_complete=max(ends) if ends else None,
            objective=CostObjective.of((attrs.get(records.CONFIG) or {}).get("objective")),
            cost_name=names[1] if len(names or []) > 1 else "cost",
        )


def _search_only(study: optuna.Study, trials: list[FrozenTrial], every: list[FrozenTrial]) -> optuna.Study:
    """The study the plots draw: the stored one, or, when it holds confirmation trials (their steps are seeds,
    not examples seen), an in-memory copy of its search trials."""
    if len(trials) == len(every):
        return study
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line
    try:
        copy = optuna.create_study(directions=study.directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    copy.add_trials(trials)
    return copy


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


# ----------------------------------------------------------------------------------------------------
# Plots: optuna's matplotlib functions, saved as PNG.


def _why_not(name: str, trials: list[FrozenTrial]) -> str | None:
    """Why the study cannot support plot ``name`` yet, or None when it can."""
    complete = complete_trials(trials)
    if name == "intermediate_values":
        curved = [t for t in trials if t.intermediate_values and t.state.name in ("COMPLETE", "PRUNED", "RUNNING")]
        return None if curved else "no trial has reported an evaluation during training yet"
    if not complete:
        return "no complete trial yet"
    if name in ("optimization_history", FRONT_PLOT):
        return None
    what = {
        "param_importances": "parameter importances need",
        "parallel_coordinate": "parallel coordinates need",
        "slice": "the slice plot needs",
    }[name]
    if len(complete) < 2:  # they compare trials
        return f"{what} at least 2 complete trials; the study has {len(complete)}"
    shared = set.intersection(*(set(t.params) for t in complete))
    if name == "slice":
        return None if any(t.params for t in complete) else "the complete trials have no parameters"
    if not shared:
        return f"{what} parameters that all complete trials share; they share none"
    if name == "parallel_coordinate":
        return None
    varying = sorted(p for p in shared if len({repr(t.params[p]) for t in complete}) > 1)
    if len(varying) < 2:
        return (
            "parameter importances need at least 2 parameters that vary across the complete trials; "
            f"varying: {', '.join(varying) or 'none'}"
        )
    if len({metric_value(t) for t in complete}) < 2:
        return "every complete trial has the same value: there is nothing to attribute to the parameters"
    return None


def _pyplot() -> Any:
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # a session that already chose a backend keeps it
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_plots(
    study: optuna.Study, trials: list[FrozenTrial], info: _StudyInfo, out: Path
) -> tuple[list[str], dict[str, str], dict[str, int], dict[str, float]]:
    """Draw each plot the study supports into out/NAME.png: drawn names, skipped reasons, curves, importances."""
    plt = _pyplot()
    import matplotlib
    import numpy as np
    import optuna.visualization.matplotlib as vis

    drawn: list[str] = []
    skipped: dict[str, str] = {}
    curves = {"total": 0, **{state: 0 for state in ("complete", "pruned", "running")}}
    importances: dict[str, float] = {}
    target = info.metric
    # A quality-against-cost study: the plots of one objective draw the metric (optuna asks which).
    metric = metric_value if info.objective is not None else None
    for name in info.plot_names:
        reason = _why_not(name, trials)
        if reason is not None:
            skipped[name] = reason
            continue
        with warnings.catch_warnings(), matplotlib.rc_context():  # optuna's matplotlib plots are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # One trial, or a parameter every trial shares: matplotlib widens the zero-width axis itself.
            warnings.filterwarnings("ignore", "Attempting to set identical", UserWarning)
            try:
                if name == "optimization_history":
                    axes = vis.plot_optimization_history(study, target=metric, target_name=target)
                elif name == "intermediate_values":
                    axes = vis.plot_intermediate_values(study)
                    curves = _mark_curves(axes, trials, target)
                elif name == "param_importances":
                    # The plot computes the importances itself and does not return them: fANOVA runs twice
                    # (a fraction of a second for hundreds of trials), so summary.json holds the same numbers.
                    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)
                    axes = vis.plot_param_importances(study, evaluator=evaluator, target=metric, target_name=target)
                    importances = optuna.importance.get_param_importances(
                        study,
                        evaluator=optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED),
                        target=metric,
                    )
                elif name == "parallel_coordinate":
                    axes = vis.plot_parallel_coordinate(study, target=metric, target_name=target)
                elif name == FRONT_PLOT:  # infeasible trials drawn apart where tpe/gp stored their constraint
                    axes = vis.plot_pareto_front(study, target_names=[info.metric, info.cost_name])
                else:
                    axes = vis.plot_slice(study, target=metric, target_name=target)
            except (ValueError, RuntimeError) as e:  # optuna refuses this study's data: say so, keep the report
                skipped[name] = f"optuna could not draw it ({type(e).__name__}: {e})"
                plt.close("all")
                continue
            fig = np.atleast_1d(axes).flat[0].figure
            _polish(name, axes, fig)
            try:
                fig.savefig(out / f"{name}.png", dpi=DPI, bbox_inches="tight")
            except OSError as e:
                raise ConfigError(
                    f"--output {out}: cannot write {name}.png ({e.strerror}); choose a writable folder"
                ) from None
            finally:
                plt.close(fig)
        drawn.append(name)
    return drawn, skipped, curves, {k: float(v) for k, v in importances.items()}


def _front_rows(view: StudyView) -> list[dict[str, Any]]:
    """A quality-against-cost study's Pareto front as data (the page's table, summary.json), cheapest first:
    each trial's metric, cost, parameter count, whether it is within max_cost and whether select picked it."""
    o, picked = view.objective, view.best
    assert o is not None
    return [
        {
            "trial": t.number,
            "metric": metric_value(t),
            "cost": cost_value(t),
            records.N_PARAMS: t.user_attrs.get(records.N_PARAMS),
            "feasible": o.feasible(t),
            "picked": picked is not None and t.number == picked.number,
            "params": dict(t.params),
        }
        for t in view.front
    ]


def _polish(name: str, axes: Any, fig: Any) -> None:
    """Light touches on optuna's figures where its defaults are hard to read; the charts stay optuna's."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    if name == "optimization_history":  # the x axis counts trials
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    elif name == "parallel_coordinate":
        # One axis per parameter needs room; Blues fades to white, which hides the worst trials' lines.
        fig.set_size_inches(max(6.4, 1.5 * len(axes.get_xticks()) + 1.5), 4.8)
        for collection in axes.collections:
            cmap = collection.get_cmap()
            colors = cmap(np.linspace(0, 1, 256))
            collection.set_cmap(ListedColormap(colors[:192] if cmap.name.endswith("_r") else colors[64:]))
    elif name == "slice":  # a log axis labels its minor ticks, which collide in a narrow panel
        for ax in np.atleast_1d(axes).flat:
            if ax.get_xscale() == "log":
                ax.tick_params(axis="x", which="both", labelrotation=35)


def _mark_curves(ax: Any, trials: list[FrozenTrial], target: str) -> dict[str, int]:
    """Label the axes, dash the curves of pruned trials, and count the curves optuna drew, per trial state."""
    state_of = {t.number: t.state.name.lower() for t in trials}
    counts = {"total": 0, "complete": 0, "pruned": 0, "running": 0}
    for line in ax.get_lines():
        match = re.fullmatch(r"Trial(\d+)", str(line.get_label()))
        if match is None:
            continue
        state = state_of.get(int(match.group(1)), "")
        counts["total"] += 1
        if state in counts:
            counts[state] += 1
        if state == "pruned":  # dashed, with crosses: visible even when pruned at the first evaluation
            line.set_linestyle("--")
            line.set_marker("x")
            line.set_label(f"{line.get_label()} (pruned)")
    ax.set_xlabel("Step (training examples seen)")
    ax.set_ylabel(f"{target} at each evaluation")
    if ax.get_legend() is not None:  # optuna's legend, again, so it shows the dashes; none for many curves
        ax.get_legend().remove()
        if counts["total"] <= MAX_LEGEND:
            ax.legend(bbox_to_anchor=(1.05, 1), loc="upper left", borderaxespad=0.0)
    return counts


# ----------------------------------------------------------------------------------------------------
# The page.

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.25rem; margin-top: 2rem;
     border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: .15rem 1rem; }
dl.meta dt { font-weight: 600; color: #555; } dl.meta dd { margin: 0; word-break: break-all; }
table { border-collapse: collapse; font-size: .88rem; } th, td { padding: .25rem .55rem; border-bottom: 1px solid #e4e4e4;
        text-align: right; white-space: nowrap; } th { background: #f4f4f4; position: sticky; top: 0; }
td.text, th.text { text-align: left; } tr.best td { font-weight: 600; background: #f3f8ff; }
.scroll { overflow-x: auto; max-width: 100%; }
figure { margin: 1.2rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: .9rem; } .skipped { color: #8a5a00; }
code { background: #f4f4f4; padding: 0 .2rem; }
"""

CAPTIONS = {
    "optimization_history": "Optimization history: {metric} of each complete trial in the order they ran, and the best so far.",
    "intermediate_values": (
        "Learning curves: {metric} at each dev evaluation, one curve per trial (step = training examples seen). "
        "Pruned trials are the curves that end early (dashed, with crosses){pruned}."
    ),
    "param_importances": (
        "Parameter importances for {metric} (fANOVA over the complete trials, seed {seed}); "
        "with few trials they are rough."
    ),
    "parallel_coordinate": "Parallel coordinates: each complete trial is one line through its parameters, coloured by {metric}.",
    "slice": "Slice plot: {metric} against each parameter, one point per complete trial (colour: trial number).",
    FRONT_PLOT: (
        "Pareto front: {metric} against the cost of each complete trial; the front is the trials no other beats "
        "on both (optuna's plot; where tpe or gp were given max_cost, the trials above it are drawn as infeasible; "
        "the table above says which are within it for any sampler)."
    ),
}
TITLES = {
    "optimization_history": "Optimization history",
    "intermediate_values": "Learning curves (intermediate values)",
    "param_importances": "Parameter importances",
    "parallel_coordinate": "Parallel coordinates",
    "slice": "Slice plot",
    FRONT_PLOT: "Pareto front (metric against cost)",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(value: datetime | None) -> str:
    return value.isoformat(sep=" ", timespec="seconds") if value else "-"


def _page(
    name: str,
    info: _StudyInfo,
    trials: list[FrozenTrial],
    best: list[FrozenTrial],
    plots: list[str],
    skipped: dict[str, str],
    curves: dict[str, int],
    out: Path,
) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Study {_e(name)}: llmflow-hpo report</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Study <code>{_e(name)}</code></h1>",
        _header(info),
        "<h2>Trials</h2>",
        _state_table(info),
        _front_table(info),
        f"<h2>Best trials by {_e(info.metric)} ({_e(info.direction)})</h2>",
        _best_table(best, info),
        _samples(best),
        _confirmation_table(info),
        _failed(trials),
        "<h2>Plots</h2>",
    ]
    pruned = sorted(t.number for t in trials if t.state == TrialState.PRUNED and t.intermediate_values)
    for plot in info.plot_names:
        parts.append(f"<h3>{_e(TITLES[plot])}</h3>")
        if plot in skipped:
            parts.append(f'<p class="skipped">Not drawn: {_e(skipped[plot])}.</p>')
            continue
        data = base64.b64encode((out / f"{plot}.png").read_bytes()).decode("ascii")
        caption = CAPTIONS[plot].format(
            metric=info.metric,
            seed=IMPORTANCE_SEED,
            pruned=f": trial{'s' if len(pruned) > 1 else ''} {', '.join(map(str, pruned))}"
            if pruned
            else "; none was pruned",
        )
        if plot == "intermediate_values" and curves["total"] > MAX_LEGEND:
            caption += f" Legend left out for {curves['total']} curves."
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{_e(TITLES[plot])}">'
            f"<figcaption>{_e(caption)} File: <code>{_e(plot)}.png</code></figcaption></figure>"
        )
    parts.append(
        f'<p class="note">Written by llmflow-hpo {_e(__version__)} from the stored study; plots by '
        "optuna.visualization.matplotlib. Times are the storage's (the workers' local clocks).</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _header(info: _StudyInfo) -> str:
    rows: list[tuple[str, str]] = [
        ("storage", info.storage or "-"),
        ("objective", f"{info.direction} {info.metric}"),
    ]
    if info.objective is not None:  # a quality-against-cost study
        o = info.objective
        limit = f"max_cost {o.max_cost:g}" if o.max_cost is not None else "no max_cost"
        rows.append(("cost", f"minimize {info.cost_name} ({limit}); retrain-best's trial: select {o.rule}"))
    cfg = info.config
    if cfg is not None:
        stopping = f"Ray {cfg.ray.scheduler} scheduler" if cfg.backend == "ray" else f"{cfg.pruner.name} pruner"
        rows += [
            ("task", cfg.task),
            ("model", cfg.model.name_or_path + (" (random init)" if cfg.model.random_init else "")),
            ("data", f"{cfg.data.format}: train {cfg.data.train}, dev {cfg.data.dev or 'split from train'}"),
            ("search", f"{cfg.sampler.name} sampler, {stopping}, n_trials {cfg.n_trials}"),
        ]
    else:
        rows.append(("config", "none stored (the study was not made by llmflow-hpo)"))
    span = (
        format_seconds((info.last_complete - info.first_start).total_seconds())
        if info.first_start and info.last_complete
        else "-"
    )
    rows += [
        ("first trial started", _when(info.first_start)),
        ("last trial finished", f"{_when(info.last_complete)} ({span} after the first start)"),
    ]
    if info.versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in info.versions.items())))
    return '<dl class="meta">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows) + "</dl>"


def _front_table(info: _StudyInfo) -> str:
    """A quality-against-cost study's Pareto front, cheapest first: trial, metric, cost, parameter count, whether
    it is within max_cost, which one ``objective.select`` picks (retrain-best's), and the parameters."""
    if info.front is None:
        return ""
    o = info.objective
    assert o is not None
    title = f"<h2>Pareto front: {_e(info.metric)} against {_e(info.cost_name)}</h2>"
    if not info.front:
        return title + '<p class="note">No complete trial yet.</p>'
    params = list(dict.fromkeys(p for r in info.front for p in r["params"]))
    head = (
        f"<tr><th>#</th><th>{_e(info.metric)}</th><th>{_e(info.cost_name)}</th><th>{records.N_PARAMS}</th>"
        '<th class="text">within max_cost</th><th class="text">picked</th>'
        + "".join(f"<th>{_e(p)}</th>" for p in params)
        + "</tr>"
    )
    rows = []
    for r in info.front:
        cells = [
            f"<td>{r['trial']}</td>",
            f"<td>{r['metric']:.4f}</td>",
            f"<td>{r['cost']:.4g}</td>",
            f"<td>{_e(r[records.N_PARAMS] if r[records.N_PARAMS] is not None else '-')}</td>",
            f'<td class="text">{"yes" if r["feasible"] else "no"}</td>',
            f'<td class="text">{"picked" if r["picked"] else ""}</td>',
            *(f"<td>{_e(format_value(r['params'][p]) if p in r['params'] else '-')}</td>" for p in params),
        ]
        rows.append(f"<tr{' class=best' if r['picked'] else ''}>" + "".join(cells) + "</tr>")
    picked = next((r["trial"] for r in info.front if r["picked"]), None)
    note = (
        f"Picked by objective.select {_e(o.rule)}"
        + (f" among the trials within max_cost {o.max_cost:g}" if o.max_cost is not None else "")
        + (f": trial {picked}, the one retrain-best trains." if picked is not None else ": none is within max_cost.")
    )
    return f'{title}<div class="scroll"><table>{head}{"".join(rows)}</table></div><p class="note">{note}</p>'


def _state_table(info: _StudyInfo) -> str:
    head = '<table><tr><th class="text">state</th><th>trials</th><th>total time</th><th>mean time</th></tr>'
    rows = []
    for state in STATES:
        n = info.counts[state]
        if n == 0 and state in ("running", "waiting"):
            continue
        sec = info.seconds[state]
        note = " (so far)" if state == "running" else ""
        total = format_seconds(sec["total_s"]) if sec["timed"] else "-"
        rows.append(
            f'<tr><td class="text">{_e(state)}</td><td>{n}</td><td>{_e(total + note)}</td>'
            f"<td>{_e(format_seconds(sec['mean_s']))}</td></tr>"
        )
    total_n = sum(info.counts.values())
    total_s = sum(float(s["total_s"] or 0) for s in info.seconds.values())
    rows.append(f'<tr><td class="text">all</td><td>{total_n}</td><td>{_e(format_seconds(total_s))}</td><td></td></tr>')
    return head + "".join(rows) + "</table>"


def _metric_columns(trials: list[FrozenTrial]) -> list[str]:
    """The dev/test metrics and the run's costs the shown trials have (``records``: the report's columns)."""
    return records.report_columns({k for t in trials for k in t.user_attrs})


def _best_table(best: list[FrozenTrial], info: _StudyInfo) -> str:
    if not best:
        return '<p class="note">No complete trial yet.</p>'
    shown = best[:TOP_TRIALS]
    picked = next((r["trial"] for r in info.front or [] if r["picked"]), None)
    params = list(dict.fromkeys(p for t in shown for p in t.params))
    metrics = [m for m in _metric_columns(shown) if m != info.metric]  # the value column already shows it
    head = (
        "<tr><th>#</th><th>"
        + _e(info.metric)
        + '</th><th class="text">state</th><th>duration</th>'
        + "".join(f"<th>{_e(p)}</th>" for p in params)
        + "".join(f"<th>{_e(m)}</th>" for m in metrics)
        + "</tr>"
    )
    rows = []
    for i, t in enumerate(shown):
        duration = format_seconds(duration_s(t))
        cells = [
            f"<td>{t.number}</td>",
            f'<td title="{_e(repr(metric_value(t)))}">{metric_value(t):.4f}</td>',
            f'<td class="text">{_e(t.state.name.lower())}</td>',
            f"<td>{_e(duration)}</td>",
            *(f"<td>{_e(format_value(t.params[p]) if p in t.params else '-')}</td>" for p in params),
            *(f"<td>{_e(format_value(t.user_attrs[m]) if m in t.user_attrs else '-')}</td>" for m in metrics),
        ]
        # a cost study's highlighted trial is the one its select rule picks, not the best metric
        marked = t.number == picked if info.front is not None else i == 0
        rows.append(f"<tr{' class=best' if marked else ''}>" + "".join(cells) + "</tr>")
    others = len(best) - len(shown)
    n_pruned, n_failed = info.counts["pruned"], info.counts["fail"]
    note = (
        (f"{others} more complete trial{'s' if others != 1 else ''} not shown; " if others else "")
        + f"{n_pruned} pruned and {n_failed} failed trial{'s' if n_failed != 1 else ''} not listed "
        "(all of them: <code>llmflow-hpo trials</code>)."
    )
    return f'<div class="scroll"><table>{head}{"".join(rows)}</table></div><p class="note">{note}</p>'


def _samples(best: list[FrozenTrial]) -> str:
    """A causal-LM study's generated answers: the dev prompts of the best trials' best evaluations, with the
    reference and the model's answer (nothing for a study of another task)."""
    parts = []
    for t in best:
        samples = t.user_attrs.get(records.BEST_SAMPLES)
        if not samples:
            continue
        rows = "".join(
            f"<tr><td><pre>{_e(s.get('prompt', ''))}</pre></td><td><pre>{_e(s.get('reference', ''))}</pre></td>"
            f"<td><pre>{_e(s.get('answer', ''))}</pre></td></tr>"
            for s in samples
        )
        parts.append(
            f"<h3>Trial {t.number}</h3><table><tr><th>prompt</th><th>reference</th><th>generated</th></tr>{rows}</table>"
        )
    if not parts:
        return ""
    return "<h2>Generated answers at the best evaluation</h2>" + "".join(parts)


def _failed(trials: list[FrozenTrial]) -> str:
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if not failed:
        return ""
    items = "".join(
        f"<li>trial {t.number}: {_e(t.user_attrs.get(records.FAIL_REASON) or 'no reason recorded')}</li>"
        for t in failed[:TOP_TRIALS]
    )
    more = f"<p class='note'>and {len(failed) - TOP_TRIALS} more.</p>" if len(failed) > TOP_TRIALS else ""
    return f"<h2>Failed trials</h2><ul>{items}</ul>{more}"


def _confirmation_table(info: _StudyInfo) -> str:
    """The confirmation stage (llmflow-hpo confirm): each configuration's per-seed scores, mean +- std, lcb,
    whether it was pruned, the confirmed winner and whether it differs from the single-run winner."""
    c = info.confirmation
    if c is None:
        return ""
    metric = info.config.metric if info.config is not None else info.metric
    params = list(dict.fromkeys(p for r in c["rows"] for p in r["params"]))
    head = (
        '<tr><th>#</th><th>confirms</th><th>single run</th><th class="text">state</th>'
        '<th class="text">scores (by seed)</th><th>mean</th><th>std</th><th>lcb</th>'
        + "".join(f"<th>{_e(p)}</th>" for p in params)
        + "</tr>"
    )
    rows = []
    for r in c["rows"]:
        scores = ", ".join(f"{seed}: {score:.4f}" for seed, score in zip(r["seeds"], r["scores"], strict=False)) or "-"
        state = r["state"] + (f" ({r['fail_reason']})" if r["fail_reason"] else "")
        cells = [
            f"<td>{r['trial']}</td>",
            f"<td>{r['confirms']}</td>",
            f"<td>{format_value(r['single_run_value']) if r['single_run_value'] is not None else '-'}</td>",
            f'<td class="text">{_e(state)}</td>',
            f'<td class="text">{_e(scores)}</td>',
            *(f"<td>{format_value(r[k]) if r[k] is not None else '-'}</td>" for k in ("mean", "std", "lcb")),
            *(f"<td>{_e(format_value(r['params'][p]) if p in r['params'] else '-')}</td>" for p in params),
        ]
        rows.append(f"<tr{' class=best' if r['winner'] else ''}>" + "".join(cells) + "</tr>")
    won, single = c["winner"], c["single_run"]
    if won is None:
        verdict = "No configuration is confirmed completely yet."
    else:
        verdict = (
            f"Confirmed winner: trial {won['trial']}, the configuration of search trial {won['confirms']}, "
            f"{mean_std_text(won, metric)}, selected by {c['select']}"
            + (f" (one-sided {c['confidence']:g} bound)" if c["select"] == "lcb" else "")
            + "."
        )
        if single is not None:
            verdict += (
                f" The single-run winner, search trial {single['trial']} ({format_value(single['value'])}), is "
                + ("another configuration." if c["differs"] else "the same configuration.")
            )
    note = (
        f"Each configuration trained with seeds {', '.join(map(str, c['seeds']))} (the search's own seed left out); "
        "a seed's score is its best dev evaluation; lcb: the mean's one-sided confidence bound on the losing side; "
        "pruned: dropped by optuna's WilcoxonPruner as clearly worse than the best confirmed configuration."
    )
    return (
        "<h2>Confirmation over seeds</h2>"
        f'<div class="scroll"><table>{head}{"".join(rows)}</table></div>'
        f'<p class="note">{_e(verdict)}</p><p class="note">{_e(note)}</p>'
    )
