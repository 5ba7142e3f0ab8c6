"""The study lock: one worker at a time claims a study's next trial.

SQLite (workers on one machine) locks ``NAME.db.lock`` beside the database; PostgreSQL takes an advisory
lock on a connection of its own. Used by the optuna backend's worker loop around "count, then create".
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from typing import Any

from llmflow_hpo.study.urls import sqlite_path

__all__ = ["StudyLock"]


class StudyLock:
    """A lock shared by every worker of one study, held while a worker claims its next trial.

    Counting "finished + running + queued < n_trials" and creating the trial must be one step, or two
    workers that count at the same moment both start the last trial. Optuna has no such primitive, so:
    SQLite (workers on one machine) locks a file beside the database; PostgreSQL takes an advisory lock
    on a connection of its own, which the server frees if the worker dies. Other databases run unlocked
    (counting may overshoot by a trial or two when several workers race).
    """

    def __init__(self, url: str, study_name: str) -> None:
        self.url, self.study_name = url, study_name
        self._fd: int | None = None
        self._conn: Any = None
        self._key = int.from_bytes(
            hashlib.sha256(f"llmflow-hpo:{study_name}".encode()).digest()[:8], "big", signed=True
        )

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def acquire(self) -> None:
        path = sqlite_path(self.url)
        if path is not None:
            if self._fd is None:
                self._fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        elif self.url.startswith("postgresql"):
            from sqlalchemy import create_engine, text
            from sqlalchemy.pool import NullPool

            if self._conn is None:
                self._conn = create_engine(self.url, poolclass=NullPool).connect()
            self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
            self._conn.commit()

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        elif self._conn is not None:
            from sqlalchemy import text

            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            self._conn.commit()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
