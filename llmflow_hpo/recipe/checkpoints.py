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

The format of ``resume.pt`` is built and read here only: ``LoopState`` is where the training loop is,
``checkpoint_state`` puts it together with the model, optimizer, scheduler and RNG states, and
``restore_state`` loads them back into a freshly set-up run. Its keys stay as they are: a checkpoint
written by an earlier version resumes.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from optuna.trial import TrialState

from llmflow_hpo.recipe.adapters import kept_weights, load_kept_weights
from llmflow_hpo.recipe.results import Evaluation
from llmflow_hpo.study import records
from llmflow_hpo.study.view import ranked

__all__ = [
    "CheckpointStore",
    "LoopState",
    "TrialCheckpoint",
    "checkpoint_state",
    "folder_size",
    "restore_state",
]

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


@dataclass
class LoopState:
    """Where the training loop is: what a checkpoint saves (``progress``) and a resumed run restores.

    The training loop updates it after every optimizer step and evaluation. ``running_loss``,
    ``running_count`` and ``stopped_early`` are not saved: a checkpoint follows an evaluation (which
    resets the running loss) that does not end the run.
    """

    epoch: int = 0
    examples_in_epoch: int = 0
    epoch_start_state: Any = None  # the training generator's state when this epoch began (a torch tensor)
    examples_seen: int = 0
    optimizer_step: int = 0
    next_point: int = 0  # the index of the next evaluation point
    since_best: int = 0  # evaluations since the last one that counts for early stopping's patience
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)  # moved back by the elapsed time of a resumed run
    history: list[Evaluation] = field(default_factory=list)
    best: Evaluation | None = None
    running_loss: float = 0.0  # the sum of the training losses since the last evaluation
    running_count: int = 0
    stopped_early: bool = False

    def progress(self) -> dict[str, Any]:
        """The ``progress`` entry of ``resume.pt``."""
        return {
            "epoch": self.epoch,
            "examples_in_epoch": self.examples_in_epoch,
            "epoch_start_state": self.epoch_start_state,
            "examples_seen": self.examples_seen,
            "optimizer_step": self.optimizer_step,
            "next_point": self.next_point,
            "since_best": self.since_best,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "elapsed": time.perf_counter() - self.started,
            "history": [dataclasses.asdict(e) for e in self.history],
            "best_index": next((i for i, e in enumerate(self.history) if e is self.best), None),
        }

    @classmethod
    def from_progress(cls, progress: dict[str, Any]) -> LoopState:
        history = [Evaluation(**e) for e in progress["history"]]
        return cls(
            epoch=progress["epoch"],
            examples_in_epoch=progress["examples_in_epoch"],
            epoch_start_state=progress["epoch_start_state"],
            examples_seen=progress["examples_seen"],
            optimizer_step=progress["optimizer_step"],
            next_point=progress["next_point"],
            since_best=progress["since_best"],
            train_seconds=progress["train_seconds"],
            eval_seconds=progress.get("eval_seconds", 0.0),  # not in checkpoints of older versions
            started=time.perf_counter() - progress["elapsed"],
            history=history,
            best=history[progress["best_index"]] if progress["best_index"] is not None else None,
        )


def checkpoint_state(
    *, model: Any, optimizer: Any, scheduler: Any, scaler: Any, loop: LoopState, device: Any
) -> dict[str, Any]:
    """The contents of ``resume.pt`` (``TrialCheckpoint.save`` adds the parameters)."""
    return {
        "model": kept_weights(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(device),
        "progress": loop.progress(),
    }


def restore_state(
    saved: dict[str, Any], *, model: Any, optimizer: Any, scheduler: Any, scaler: Any, device: Any
) -> LoopState:
    """Load a saved state into a freshly set-up run (every RNG too); the loop state it had reached."""
    load_kept_weights(model, saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    _set_rng_state(saved["rng"], device)
    return LoopState.from_progress(saved["progress"])


def _rng_state(device: Any) -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], device: Any) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


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

    def remember_best(self, model: Any) -> dict[str, Any] | None:
        """A copy of the weights on the CPU, written later (see the class); returns the copy."""
        self._best = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in kept_weights(model).items()}
        return self._best

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
            t.user_attrs.get(records.CHECKPOINT_TRIAL)
            for t in trials
            if t.state in (TrialState.WAITING, TrialState.RUNNING)
        }
        kept = {t.number for t in ranked(trials, direction)[: self.keep_best]}  # the best (study.view's rule)
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
