"""One exception hierarchy for every known failure of llmflow-hpo.

A ``LlmflowError`` is a failure the user can fix: the CLI prints its one-line message and exits 1.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "Interrupted", "LlmflowError", "StorageError", "TrialFailure", "WorkerError"]


class LlmflowError(Exception):
    """A known failure, reported to the user as one line."""


class ConfigError(LlmflowError):
    """A study config or search-space file is invalid.

    ``problems`` holds every problem found, each already naming the file and the field.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(LlmflowError):
    """A data file cannot be read or holds unusable examples."""

    def __init__(self, path: object, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class StorageError(LlmflowError):
    """The study storage cannot be opened, or the study in it does not fit the request."""


class TrialFailure(LlmflowError):
    """A trial that cannot produce a metric (diverged, out of memory): it ends as FAIL with a reason."""


class WorkerError(LlmflowError):
    """A worker process of ``search --workers N`` ended with an error."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached a worker: the running trial is recorded, then the process exits 128+signal."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted ({signal.Signals(signum).name})")


def interrupted_reason(error: KeyboardInterrupt) -> str:
    """The failure reason of a trial that Ctrl-C or a signal ended: ``interrupted (SIGTERM)``."""
    return str(error) if isinstance(error, Interrupted) else "interrupted (SIGINT)"
