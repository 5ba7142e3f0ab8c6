"""Where a study's database is: the one default-storage rule and the one parser of SQLite URLs.

The rule: a study NAME is kept in ``NAME.db`` in the folder of its config (``default_storage``). The
commands that name a study without a config (``--study NAME`` without ``--storage``) look where the
shipped configs are, ``studies/``: ``studies/NAME.db`` (``default_storage_for``); ``dashboard`` without
``--study`` takes the one optuna database there (``only_storage_here``).

``sqlite_path`` is the one reader of ``sqlite:///PATH?query`` URLs (the storage, the study lock, the
checkpoint and MLflow artifact folders beside the database). Read only: nothing here writes a file.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from llmflow_hpo.errors import StorageError

__all__ = [
    "OPTUNA_TABLES",
    "STUDIES",
    "default_path",
    "default_storage",
    "default_storage_for",
    "in_memory",
    "is_optuna_sqlite",
    "only_storage_here",
    "sqlite_path",
    "sqlite_tables",
    "sqlite_url",
]

SQLITE = "sqlite:///"
OPTUNA_TABLES = frozenset({"studies", "version_info"})  # what makes an SQLite file optuna's
STUDIES = Path("studies")  # where the shipped configs, and so their databases, live


def in_memory(url: str) -> bool:
    """``sqlite://``, ``sqlite:///`` and ``sqlite:///:memory:``: a database that ends with the process."""
    return url.split("?", 1)[0] in ("sqlite://", "sqlite:///", "sqlite:///:memory:")


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL (relative to the working folder unless PATH is absolute,
    as in ``sqlite:////abs/NAME.db``), its query left off; None for other URLs and in-memory databases."""
    if url.startswith(SQLITE) and not in_memory(url):
        return Path(url[len(SQLITE) :].split("?", 1)[0])
    return None


def sqlite_url(path: Path) -> str:
    """The URL of the SQLite file ``path``, made absolute."""
    return f"{SQLITE}{path.resolve()}"


def default_path(folder: Path, study_name: str) -> Path:
    """The rule: study NAME's database is NAME.db in ``folder`` (its config's)."""
    return folder / f"{study_name}.db"


def default_storage(folder: Path, study_name: str) -> str:
    """A config without ``storage``: the URL of ``default_path`` beside the config."""
    return sqlite_url(default_path(folder, study_name))


def default_storage_for(study_name: str) -> str:
    """Where ``--study NAME`` without ``--storage`` looks: the default SQLite file of a config in ./studies/."""
    path = default_path(STUDIES, study_name)
    if not path.exists():
        raise StorageError(
            f"no --storage given and {path} does not exist; pass --storage URL (e.g. sqlite:///path/to/{study_name}.db)"
        )
    return sqlite_url(path)


def only_storage_here() -> str:
    """Without ``--study`` and ``--storage``: the one optuna database in ``studies/`` (MLflow's is not)."""
    found = sorted(p for p in STUDIES.glob(default_path(Path(), "*").name) if is_optuna_sqlite(p))
    if len(found) == 1:
        return sqlite_url(found[0])
    held = f"{len(found)} ({', '.join(p.name for p in found)})" if found else "none"
    raise StorageError(
        f"no --storage given and studies/*.db here: {held}; pass --storage URL (e.g. sqlite:///studies/NAME.db) "
        "or --study NAME"
    )


def sqlite_tables(path: Path) -> set[str] | None:
    """The tables of an SQLite file, read only (the file is not changed); None when it cannot be read."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:  # not a database, or not readable
        return None


def is_optuna_sqlite(path: Path) -> bool:
    """Whether the SQLite file holds optuna's tables (read only: the file is not changed)."""
    return OPTUNA_TABLES <= (sqlite_tables(path) or set())
