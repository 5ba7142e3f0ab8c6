"""How a command that runs trials takes Ctrl-C and SIGTERM: as ``Interrupted``, so the running trial is recorded.

The search's workers (``backends/optuna_backend``) and ``confirm`` install it around their trials.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from llmflow_hpo.errors import Interrupted

__all__ = ["Signals"]


class Signals:
    """SIGINT and SIGTERM raise ``Interrupted`` once; repeats are ignored.

    Inside ``critical()`` (claiming a trial, telling its result) a signal waits until the section ends:
    a trial created but never given its heartbeat would hold its slot with nothing to detect it.
    """

    depth = 0
    pending: int | None = None
    fired = False

    @classmethod
    def _handler(cls, signum: int, _frame: Any) -> None:
        if cls.fired:
            return
        if cls.depth:
            cls.pending = cls.pending or signum
            return
        cls.fired = True
        raise Interrupted(signum)

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        cls.depth, cls.pending, cls.fired = 0, None, False
        previous = {s: signal.signal(s, cls._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    @classmethod
    @contextlib.contextmanager
    def critical(cls) -> Iterator[None]:
        cls.depth += 1
        try:
            yield
        finally:
            cls.depth -= 1
        if cls.depth == 0 and cls.pending is not None and not cls.fired:
            signum, cls.pending, cls.fired = cls.pending, None, True
            raise Interrupted(signum)
