"""The study in its SQL database, through optuna's RDB storage (SQLite by default, PostgreSQL for many workers).

Opening the storage (checks before anything is written, WAL, heartbeats and retries of dead trials,
retries of transient errors) and opening, loading or naming a study. Where the database is lives in
``urls``, the study lock in ``lock``, what a study stores about its making in ``provenance``, its
dashboard note in ``note``. The study carries everything ``retrain-best`` needs: the resolved config, the
search space and the versions of the libraries that ran it (``study.user_attrs``, see ``records``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sqlite3
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna

from llmflow_hpo.config.study import HeartbeatConfig, StudyConfig, config_to_dict
from llmflow_hpo.errors import StorageError
from llmflow_hpo.paths import probe_folder, writable_problem
from llmflow_hpo.study import records
from llmflow_hpo.study.front import COST_ATTRIBUTES
from llmflow_hpo.study.note import write_study_note
from llmflow_hpo.study.provenance import check_same_study, library_versions
from llmflow_hpo.study.urls import OPTUNA_TABLES, in_memory, is_optuna_sqlite, sqlite_path, sqlite_tables
from llmflow_hpo.study.view import FINISHED_STATES, search_trials

__all__ = [
    "check_storage",
    "finished_trials",
    "free_study_name",
    "load_study",
    "open_storage",
    "open_study",
    "require_study",
    "retry_callback",
    "retry_transient",
]

T = TypeVar("T")

_IN_MEMORY = (
    "an in-memory SQLite database: the study would be lost when the command ends; "
    "use a file, e.g. storage: sqlite:///path/to/NAME.db"
)
_URL_FORMS = (
    "e.g. sqlite:///NAME.db (a file relative to the working folder), sqlite:////abs/path/NAME.db "
    "or postgresql+psycopg://user@host/db"
)
_SQLITE_HEADER = b"SQLite format 3\x00"


def _sqlite_header(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(len(_SQLITE_HEADER))


def _sqlite_file_problem(path: Path) -> str | None:
    """Why the existing file ``path`` cannot hold optuna's study tables, or None (read only)."""
    try:
        head = _sqlite_header(path)
    except OSError as e:
        return f"cannot read {path} ({e.strerror})"
    if not head:  # an empty file: SQLite makes a new database in it
        return None
    if head != _SQLITE_HEADER:
        return f"{path} is not an SQLite database; name a new .db file or the study's database"
    tables = sqlite_tables(path)
    if tables is None:
        return f"{path} cannot be read as an SQLite database"
    if tables and not OPTUNA_TABLES <= tables:
        shown = ", ".join(sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
        return (
            f"{path} is another tool's database (tables {shown}), not optuna's; optuna would add its tables "
            "to it: name a new file for the study"
        )
    return None


def check_storage(url: str, *, probe: bool = False) -> str | None:
    """Why a search cannot keep its study in ``url`` (None when it can), found before anything is written.

    SQLite: the file must be new, empty or an optuna database, in a folder that exists and takes new files
    (the database's journal and the study lock lie beside it). ``probe`` (search, worker): also make and
    remove an empty file in that folder, and connect to a server database, so that what only trying shows
    is found before the data is tokenized.
    """
    if in_memory(url):
        return _IN_MEMORY
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return f"not a database URL; {_URL_FORMS}"
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        return f"unknown kind of database {parsed.drivername!r}; {_URL_FORMS}"
    try:
        dialect.import_dbapi()
    except ImportError as e:
        hint = "pip install 'llmflow-hpo[postgres]'" if parsed.drivername.startswith("postgres") else "install it"
        return f"database driver missing ({e}); {hint}"
    if parsed.drivername.startswith("sqlite"):
        path = sqlite_path(url)
        if path is None:
            return f"an SQLite URL has three slashes before the file's path: {_URL_FORMS}"
        if url.split("?", 1)[0].endswith("/"):
            return f"the path ends with '/', a folder; name the database file in it, e.g. sqlite:///{path / 'NAME.db'}"
        return _sqlite_location_problem(path, probe=probe)
    if probe:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        try:
            with create_engine(url, poolclass=NullPool).connect():
                pass
        except Exception as e:  # sqlalchemy's connection errors: one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return f"cannot connect ({reason})"
    return None


def _sqlite_location_problem(path: Path, *, probe: bool) -> str | None:
    if path.is_dir():
        return f"{path} is a folder, not a database file; name a file in it, e.g. sqlite:///{path / 'NAME.db'}"
    if path.exists():
        if not path.is_file():
            return f"{path} is not a regular file; name a .db file"
        problem = _sqlite_file_problem(path)
        if problem:
            return problem
        if not os.access(path, os.R_OK | os.W_OK):
            return f"{path} is not writable (permission denied)"
    folder = path.parent
    if not folder.exists():
        return f"folder {folder} does not exist; create it or change storage"
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    problem = writable_problem(folder) or (probe_folder(folder) if probe else None)
    if problem:
        return f"{problem}; SQLite needs to make its database and journal files there"
    return None


def _sqlite_wal(path: Path) -> None:
    """Write-ahead logging: readers never block the writer, so several local workers share one file.

    The mode is stored in the database file itself; setting it once is enough for every later connection.
    """
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as con:
            con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as e:
        raise StorageError(f"storage sqlite:///{path}: cannot open ({e})") from None


def open_storage(
    url: str, heartbeat: HeartbeatConfig | None = None, *, existing: bool = False
) -> optuna.storages.BaseStorage:
    """An optuna RDB storage for ``url``; with ``heartbeat``, dead trials are detected and queued again.

    SQLite runs in WAL mode and waits up to 60 s for a lock instead of failing at once. A trial whose
    heartbeat stops (its worker was killed) is failed by the next worker that looks, and retried with the
    same parameters and its intermediate values (optuna's RetryHeartbeatStaleTrialCallback).
    ``existing``: the storage must already hold optuna's tables (commands that read studies): a missing
    SQLite file or one of another tool is an error, and the file is opened as it is (optuna would create
    its tables in any SQLite file).
    """
    engine_kwargs: dict[str, Any] = {}
    if in_memory(url):
        raise StorageError(f"storage {url}: {_IN_MEMORY}")
    path = sqlite_path(url)
    if path is not None:
        if not path.parent.exists():
            raise StorageError(f"storage {url}: folder {path.parent} does not exist; create it or change storage")
        if path.is_dir():
            raise StorageError(f"storage {url}: {path} is a folder, not a database file; name the study's .db file")
        if existing and not path.is_file():
            raise StorageError(f"storage {url}: file {path} does not exist; pass --storage URL of the study's database")
        if existing and path.stat().st_size:
            try:
                head = _sqlite_header(path)
            except OSError as e:
                raise StorageError(f"storage {url}: cannot read {path} ({e.strerror})") from None
            if head != _SQLITE_HEADER:
                raise StorageError(
                    f"storage {url}: {path} is not an SQLite database; pass --storage URL of the study's database"
                )
        if existing and not is_optuna_sqlite(path):
            raise StorageError(
                f"storage {url}: {path} holds no optuna studies (another tool's database?); "
                "pass --storage URL of the study's database"
            )
        if not existing:
            problem = _sqlite_file_problem(path) if path.is_file() else None
            if problem:  # never add optuna's tables to another tool's database, nor switch it to WAL
                raise StorageError(f"storage {url}: {problem}")
            _sqlite_wal(path)
        engine_kwargs["connect_args"] = {"timeout": 60}
    beat: dict[str, Any] = {}
    if heartbeat is not None:
        beat = {
            "heartbeat_interval": heartbeat.interval,
            "grace_period": heartbeat.grace_period or 3 * heartbeat.interval,
            "heartbeat_stale_trial_callback": retry_callback(heartbeat),
        }
    try:
        with warnings.catch_warnings():  # the heartbeat arguments are "experimental" in optuna since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **beat)
    except ImportError as e:
        raise StorageError(
            f"storage {url}: database driver missing ({e}); e.g. pip install 'llmflow-hpo[postgres]'"
        ) from None
    except Exception as e:  # sqlalchemy's connection errors: one line, the URL named
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"storage {url}: cannot open ({reason})") from None


def retry_callback(heartbeat: HeartbeatConfig) -> Callable[[optuna.Study, Any], None]:
    """Queue a dead or interrupted trial again: same parameters, its intermediate values inherited."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=heartbeat.max_retries, inherit_intermediate_values=True
        )


def retry_transient(fn: Callable[[], T], *, attempts: int = 6) -> T:
    """Run a storage call again when the database said "try again" (SQLite locked, PostgreSQL deadlock).

    Only for calls whose failed attempt left nothing behind: the transaction was rolled back.
    """
    from sqlalchemy.exc import OperationalError

    for attempt in range(attempts):
        try:
            return fn()
        except OperationalError as e:
            text = str(e).lower()
            transient = any(s in text for s in ("database is locked", "deadlock", "could not serialize", "busy"))
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(min(0.1 * 2**attempt, 2.0) * (1 + random.random()))
    raise AssertionError("unreachable")


def open_study(
    cfg: StudyConfig,
    space_raw: dict[str, Any],
    *,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    data_report: list[str],
    heartbeat: HeartbeatConfig | None = None,
) -> optuna.Study:
    """Create the study, or load it when it exists and was made by the same config.

    A rerun may change ``n_trials``: the stored config takes the new target, so workers that join from
    other machines (``llmflow-hpo worker``) run towards it. The study carries a note for optuna-dashboard
    (``note.study_note``: what it searches, on which data and model, how to read its trials); a study
    without one gets it, a note the user edited stays.
    """
    assert cfg.storage is not None
    storage = open_storage(cfg.storage, heartbeat)
    exists = cfg.study_name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.study_name,
        directions=cfg.directions,  # the metric's; a cost study's second is the cost's (minimize)
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    if exists:
        stored_directions = [d.name.lower() for d in study.directions]
        if stored_directions != cfg.directions:
            raise StorageError(
                f"study {cfg.study_name!r} in {cfg.storage} has direction {', '.join(stored_directions)}; "
                f"the config says {', '.join(cfg.directions)} (objective.direction, objective.cost)"
            )
        check_same_study(study, cfg, space_raw)
        write_study_note(study, cfg, space_raw, data_report)  # a study made before the note had none
        stored = study.user_attrs[records.CONFIG]
        # What a rerun may change for the workers that join later (and retrain-best): the target, the tracking.
        tracking = json.loads(json.dumps(dataclasses.asdict(cfg.tracking)))
        if stored.get("n_trials") != cfg.n_trials or stored.get("tracking") != tracking:
            study.set_user_attr(records.CONFIG, {**stored, "n_trials": cfg.n_trials, "tracking": tracking})
        return study
    study.set_user_attr(records.CONFIG, json.loads(json.dumps(config_to_dict(cfg))))
    study.set_user_attr(records.SEARCH_SPACE, space_raw)
    study.set_user_attr(records.VERSIONS, library_versions())
    study.set_user_attr(records.DATA_REPORT, data_report)
    study.set_user_attr(records.METRIC, cfg.metric)
    with warnings.catch_warnings():  # experimental in optuna, but it is what names the objective in the dashboard
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([records.dev(cfg.metric), *_cost_names(cfg)])
    write_study_note(study, cfg, space_raw, data_report)
    return study


def _cost_names(cfg: StudyConfig) -> list[str]:
    """The cost objective's name in the dashboard (``latency_ms``, ``n_params``, ``peak_memory_mb``), if any."""
    return [] if cfg.objective.cost is None else [COST_ATTRIBUTES[cfg.objective.cost]]


def free_study_name(storage_url: str, study_name: str) -> str:
    """``study_name`` when the storage has no such study, else the first free ``study_name-2``, ``-3``..."""
    storage = open_storage(storage_url)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if study_name not in names:
        return study_name
    k = 2
    while f"{study_name}-{k}" in names:
        k += 1
    return f"{study_name}-{k}"


def load_study(study_name: str, storage_url: str) -> optuna.Study:
    """An existing study, or a StorageError that lists the studies the storage does hold."""
    storage = open_storage(storage_url, existing=True)
    require_study(storage, study_name, storage_url)
    return optuna.load_study(study_name=study_name, storage=storage)


def require_study(storage: optuna.storages.BaseStorage, study_name: str, storage_url: str) -> None:
    """A StorageError that lists the studies the storage holds, unless it holds ``study_name``."""
    names = optuna.study.get_all_study_names(storage)
    if study_name not in names:
        held = ", ".join(names) if names else "none"
        raise StorageError(f"no study {study_name!r} in {storage_url} (studies there: {held})")


def finished_trials(study: optuna.Study) -> int:
    """Trials that count towards n_trials: complete or pruned search trials (confirmation trials do not)."""
    return len(search_trials(study.get_trials(deepcopy=False, states=FINISHED_STATES)))
