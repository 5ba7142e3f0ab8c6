"""The search driver: the steps every search takes, once, whichever backend runs its trials.

``run_search``: tokenize the data, resolve the study's name (``--new-study``), build the sampler and the
pruner, open or create the study, say what it holds and whether anything is left to run, open the search's
trackers, let the backend run the trials, and return the summary. A backend supplies only how trials run
(``TrialRunner``): optuna workers (``backends.optuna_backend.OptunaTrials``) or Ray Tune
(``backends.ray_backend.runs.RayTrials``). Nothing here imports torch or Ray.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.search.spaces import SearchSpace
from llmflow_hpo.search.strategy import StudyGrid, build_pruner, build_sampler, study_target
from llmflow_hpo.study.urls import sqlite_path

__all__ = [
    "SearchRun",
    "SearchSummary",
    "TrialRunner",
    "checkpoint_root",
    "open_features",
    "run_search",
    "search_strategy",
    "summarize",
]

Log = Callable[[str], None]


@dataclass
class SearchSummary:
    study_name: str
    storage: str
    ran: int
    counts: dict[str, int]
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    workers: int = 1
    checkpoint_bytes: int = 0
    retried: int = 0  # failed trials (killed, interrupted) that a later trial repeated
    target: int | None = None  # finished trials the study aims at: n_trials, at most the grid's size
    best_cost: float | None = None  # a quality-against-cost study: the picked trial's cost (objective.select)


@dataclass
class SearchRun:
    """What a backend's ``TrialRunner.run`` is given: the open study, its tokenized data, where to say things."""

    cfg: StudyConfig
    space: SearchSpace
    features: Any  # data.features.Features
    study: optuna.Study
    sampler: optuna.samplers.BaseSampler
    target: int | None
    remaining: int | None  # trials still missing (None: no count, a timeout ends the study)
    source: str  # where the config came from, for messages
    say: Log  # the search's log as given (a Progress, or a function of one line)
    progress: Any  # views.progress.Progress over ``say``
    tracking: Any  # views.tracking.Tracking: the search's trackers, open while the run lasts
    started: float  # time.perf_counter() when the trials began
    budget: Any = None  # search.budget.Budget of this run, or None (no budget)

    def took(self) -> str:
        """The line that ends a search: how long it took."""
        return f"study {self.cfg.study_name}: search took {time.perf_counter() - self.started:.1f}s"


class TrialRunner(Protocol):
    """How one backend runs a study's trials; ``run_search`` does every other step.

    ``run_search`` calls, in this order: ``check`` (the data tokenized, no study opened yet), ``unfinished``
    (the study open, before deciding whether anything is left to run), ``announce`` (just before the run
    starts) and ``run`` (inside the search's trackers). ``workers`` and ``heartbeat`` are read when the
    study is opened and summarized.
    """

    workers: int  # processes running trials at once, as the summary reports them
    heartbeat: bool  # whether trials record heartbeats (the storage is opened with the study's heartbeat)

    def check(self, cfg: StudyConfig, space: SearchSpace, n_train: int, source: str) -> None:
        """Refuse (``ConfigError``) a setting the backend would fail on, before any study is stored."""
        ...

    def unfinished(self, cfg: StudyConfig, study: optuna.Study) -> bool:
        """Whether the study holds work of this backend to continue that no count of finished trials shows
        (an interrupted Ray run): the backend then runs even when the study holds its ``n_trials``."""
        ...

    def announce(self, cfg: StudyConfig, remaining: int | None) -> str | None:
        """The line said before the run starts; None when the backend says its own as it goes."""
        ...

    def run(self, run: SearchRun) -> None:
        """Run the study's missing trials; returns when they ran, raises ``Interrupted`` when stopped."""
        ...


def say_on_stderr(line: str) -> None:
    """Where a search's lines go when its caller gives no log: stderr (stdout keeps the result)."""
    print(line, file=sys.stderr)


def open_features(cfg: StudyConfig, say: Log, data: Any = None) -> Any:
    """The study's tokenized splits (``data``: the splits already read). optuna's own log is silenced: the
    search's progress lines report each trial (fail reasons included); optuna would repeat them."""
    from llmflow_hpo.data.features import prepare_features

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return prepare_features(cfg, log=say, data=data)


def search_strategy(
    cfg: StudyConfig, space: SearchSpace, n_train: int
) -> tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner]:
    """The study's sampler and pruner (both backends store the same study; Ray asks its sampler too)."""
    return build_sampler(cfg, space), build_pruner(cfg, n_train, space)


def checkpoint_root(cfg: StudyConfig) -> Path:
    """The study's checkpoint folder; a config without ``checkpoint.dir`` (a study stored by an older
    version) uses ``checkpoints/`` beside its SQLite file, or in the working directory."""
    if cfg.checkpoint.dir is not None:
        return Path(cfg.checkpoint.dir) / cfg.study_name
    path = sqlite_path(str(cfg.storage))
    return (path.parent if path is not None else Path.cwd()) / "checkpoints" / cfg.study_name


def summarize(study: optuna.Study, cfg: StudyConfig, ran: int, workers: int, target: int | None) -> SearchSummary:
    """The search's summary: trials by state and the best one (``study.view``), the checkpoints' size, the
    retries."""
    from llmflow_hpo.recipe.checkpoints import folder_size
    from llmflow_hpo.study import records
    from llmflow_hpo.study.front import cost_value, metric_value
    from llmflow_hpo.study.view import StudyView, search_trials

    view = StudyView.of(study)
    best = view.best
    size = folder_size(checkpoint_root(cfg))
    return SearchSummary(
        study_name=cfg.study_name,
        storage=str(cfg.storage),
        ran=ran,
        counts=dict(view.counts),
        best_number=best.number if best else None,
        best_value=metric_value(best) if best else None,
        best_cost=cost_value(best) if best else None,
        best_params=dict(best.params) if best else {},
        workers=workers,
        checkpoint_bytes=size,
        retried=len(
            {t.user_attrs[records.RETRY_OF] for t in search_trials(view.trials) if records.RETRY_OF in t.user_attrs}
        ),
        target=target,
    )


def _nothing_to_run(
    cfg: StudyConfig, study: optuna.Study, sampler: Any, done: int, remaining: int | None, unfinished: bool, say: Log
) -> bool:
    """Whether the study is done already (the line that says so is said); the same rule for both backends:
    a grid whose every point has run (a point that failed for good is not run again), or ``n_trials``
    finished trials, with nothing of the backend's to continue."""

    if isinstance(sampler, StudyGrid) and not unfinished:
        queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not queued and sampler.is_exhausted(study):
            say(f"{sampler.done_line(cfg.study_name)}; nothing to run")
            return True
    if remaining == 0 and not unfinished:
        say(f"study {cfg.study_name}: already holds {done} finished trials (n_trials={cfg.n_trials}); nothing to run")
        return True
    return False


def run_search(
    cfg: StudyConfig,
    space: SearchSpace,
    space_raw: dict[str, Any],
    trials: TrialRunner,
    *,
    new_study: bool = False,
    log: Log | None = None,
    source: str = "config",
    data: Any = None,
) -> SearchSummary:
    """Tokenize once (``data``: the splits already read), open (or continue) the study, and let ``trials``
    run the missing trials."""
    from llmflow_hpo.search.budget import Budget
    from llmflow_hpo.search.first_trials import queue_first_trials
    from llmflow_hpo.study.storage import finished_trials, free_study_name, open_study
    from llmflow_hpo.views.progress import as_progress
    from llmflow_hpo.views.tracking import search_tracking

    budget = Budget(cfg.budget_s) if cfg.budget_s is not None else None  # tokenizing counts
    say = log or say_on_stderr
    features = open_features(cfg, say, data)
    assert cfg.storage is not None
    if new_study:
        cfg.study_name = free_study_name(cfg.storage, cfg.study_name)
        say(f"study {cfg.study_name}: a new study, as --new-study asked")
    n_train = len(features.splits["train"])
    trials.check(cfg, space, n_train, source)
    sampler, pruner = search_strategy(cfg, space, n_train)
    heartbeat = cfg.heartbeat if trials.heartbeat else None
    study = open_study(cfg, space_raw, sampler=sampler, pruner=pruner, data_report=features.report, heartbeat=heartbeat)
    queue_first_trials(study, cfg, space, say)
    done = finished_trials(study)
    target = study_target(cfg, space)
    remaining = None if target is None else max(target - done, 0)
    unfinished = trials.unfinished(cfg, study)
    if done:
        say(f"study {cfg.study_name}: continuing, {done} finished trial(s) already stored")
    if target is not None and target != cfg.n_trials:
        say(f"study {cfg.study_name}: the grid has {target} point(s); the study ends when each has run")
    if _nothing_to_run(cfg, study, sampler, done, remaining, unfinished, say):
        return summarize(study, cfg, 0, trials.workers, target)
    line = trials.announce(cfg, remaining)
    if line is not None:
        say(line)
    started = time.perf_counter()
    progress = as_progress(say)
    # The study's trackers (and its MLflow run) are opened here, before any trial starts.
    with search_tracking(cfg, study, log=progress.warn) as tracking:
        run = SearchRun(
            cfg, space, features, study, sampler, target, remaining, source, say, progress, tracking, started, budget
        )
        trials.run(run)
    if cfg.objective.cost is not None:  # a quality-against-cost study: its dashboard note shows the front now
        from llmflow_hpo.study.note import write_front_note
        from llmflow_hpo.study.view import StudyView

        write_front_note(study, StudyView.of(study))
    say(run.took())
    return summarize(study, cfg, finished_trials(study) - done, trials.workers, target)
