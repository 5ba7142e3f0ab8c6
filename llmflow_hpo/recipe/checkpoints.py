"""Per-trial checkpoints: what a retried trial resumes from, and the best models a study keeps.

Layout: ``<checkpoint.dir>/<study_name>/trial-<N>/`` holds

- ``resume.pt``: everything the training loop needs to continue exactly where it was (model, optimizer,
  scheduler, every RNG state, the position in the epoch, the evaluations so far). Rewritten after dev
  evaluations (see ``TrialCheckpoint``); written to a temporary file and renamed, so a kill in the
  middle of a write leaves the previous checkpoint intact.
- ``best.safetensors``: the model weights at the trial's best evaluation so far.

A retry of trial N (same parameters, queued by the heartbeat callback or after an interruption) renames
``trial-N`` to its own number and resumes from it. When a trial ends, ``cleanup`` deletes what is no
longer needed: pruned and failed trials' folders, the resume state of finished ones, and the best models
of all but the ``keep_best`` best complete trials.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

__all__ = ["CheckpointStore", "TrialCheckpoint", "folder_size"]

RESUME = "resume.pt"
BEST = "best.safetensors"


def folder_size(path: Path) -> int:
    """Bytes used by the files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # deleted by another worker's cleanup meanwhile
                pass
    return total


class TrialCheckpoint:
    """The checkpoint folder of one trial. The training loop asks ``due()`` after each evaluation.

    A checkpoint is due after every ``every_evals``-th evaluation, provided the time since the last
    write is at least ``1 / max_overhead`` times what that write took: writing then costs at most about
    ``max_overhead`` of the trial's time, whatever the model size and the disk (the first one is always
    written unless an earlier trial of this process measured the cost). The best model is kept in memory when the dev metric improves and
    written with the next checkpoint, or when the trial completes: a pruned trial never writes it.
    """

    def __init__(
        self,
        folder: Path,
        params: dict[str, Any],
        every_evals: int = 1,
        max_overhead: float = 1.0,
        write_s: float | None = None,
        on_write: Callable[[float], None] | None = None,
        accept_other_params: bool = False,
    ) -> None:
        self.folder = folder
        self.params = params
        self.accept_other_params = accept_other_params  # PBT: a cloned trial continues with mutated parameters
        self.every_evals = every_evals
        self.max_overhead = max_overhead
        self.seconds = 0.0  # time spent writing, for the trial's user attributes
        self.written = 0
        self._evals = 0
        self._last_write_s = write_s  # known from an earlier trial of this process: no blind first write
        self._on_write = on_write
        self._last_write_end = time.perf_counter()
        self._best: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none (or it belongs to other parameters, unless accepted)."""
        import torch

        path = self.folder / RESUME
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("params") != self.params and not self.accept_other_params:
            return None
        self._evals = len(state["progress"]["history"])
        return state

    def due(self) -> bool:
        """Called once after each evaluation that does not end the run."""
        self._evals += 1
        if self._evals % self.every_evals:
            return False
        if self._last_write_s is None:
            return True
        return (time.perf_counter() - self._last_write_end) * self.max_overhead >= self._last_write_s

    def save(self, state: dict[str, Any]) -> None:
        import torch

        tick = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_best()
        tmp = self.folder / f".{RESUME}.{os.getpid()}.tmp"
        torch.save({**state, "params": self.params}, tmp)
        os.replace(tmp, self.folder / RESUME)
        self._last_write_end = time.perf_counter()
        self._last_write_s = self._last_write_end - tick
        self.seconds += self._last_write_s
        self.written += 1
        if self._on_write is not None:
            self._on_write(self._last_write_s)

    def remember_best(self, model: Any) -> None:
        """A copy of the weights on the CPU, written later (see the class)."""
        self._best = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}

    def finish(self) -> None:
        """The trial completed: its best model goes to disk."""
        tick = time.perf_counter()
        if self._write_best():
            self.seconds += time.perf_counter() - tick

    def _write_best(self) -> bool:
        if self._best is None:
            return False
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{BEST}.{os.getpid()}.tmp"
        save_file(self._best, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.folder / BEST)
        self._best = None
        return True


class CheckpointStore:
    """The checkpoint folders of one study."""

    def __init__(self, root: Path, *, every_evals: int = 1, max_overhead: float = 1.0, keep_best: int = 2) -> None:
        self.root = root
        self.every_evals = every_evals
        self.max_overhead = max_overhead
        self.keep_best = keep_best
        self.write_s: float | None = None  # the last checkpoint write of this process took this long

    def folder(self, number: int) -> Path:
        return self.root / f"trial-{number}"

    def trial(self, number: int, params: dict[str, Any]) -> TrialCheckpoint:
        def learn(seconds: float) -> None:
            self.write_s = seconds

        return TrialCheckpoint(
            self.folder(number), params, self.every_evals, self.max_overhead, write_s=self.write_s, on_write=learn
        )

    def take_over(self, previous: int, number: int) -> bool:
        """Move the checkpoint of an earlier attempt to the retry's own folder; False when there is none."""
        source, target = self.folder(previous), self.folder(number)
        if not source.is_dir():
            return target.is_dir()
        if target.exists():  # an attempt of this very trial was interrupted after taking over before
            shutil.rmtree(target, ignore_errors=True)
        os.replace(source, target)
        return True

    def cleanup(self, trials: list[Any], direction: str) -> None:
        """Delete the folders and files no trial can still use. Call with the study lock held."""
        if not self.root.is_dir():
            return
        by_number = {t.number: t for t in trials}
        # Earlier attempts a queued or running retry may still take over.
        pending = {
            t.user_attrs.get("checkpoint_trial") for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)
        }
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        complete.sort(key=lambda t: t.value, reverse=direction == "maximize")
        kept = {t.number for t in complete[: self.keep_best]}
        for folder in self.root.glob("trial-*"):
            try:
                number = int(folder.name.split("-", 1)[1])
            except ValueError:
                continue
            trial = by_number.get(number)
            if trial is None or trial.state in (TrialState.RUNNING, TrialState.WAITING):
                continue
            if trial.state == TrialState.FAIL and number in pending:
                continue
            if trial.state == TrialState.COMPLETE and number in kept:
                (folder / RESUME).unlink(missing_ok=True)
                continue
            shutil.rmtree(folder, ignore_errors=True)

    def disk_usage(self) -> int:
        return folder_size(self.root)
