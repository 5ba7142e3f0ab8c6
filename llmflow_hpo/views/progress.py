"""What ``search`` shows while it runs, on stderr (stdout keeps the result).

Four forms, one object:

- ``live`` (stderr is a terminal): lines for what happened (a trial started, ended, a new best) scroll
  above one status line that is redrawn in place: the running trial's progress bar (examples seen of
  its run, training loss, last dev metric), the study's counts against the target, the best value and
  an estimate of the time left.
- ``lines`` (stderr is a file or a pipe, or several workers): the same events, one plain line each, and
  a line per dev evaluation instead of the bar.
- ``json`` (``--json``): every event as one JSON object per line, for scripts.
- ``quiet`` (``--quiet``): only warnings (a tracker that failed) and errors.

The object is also the search's log function: ``progress("message")`` prints a line in every form but
``quiet`` (``json`` wraps it as a ``log`` event), so log lines never tear the status line apart.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Literal, TextIO

from optuna.trial import TrialState

from llmflow_hpo.study import records
from llmflow_hpo.study.front import CostObjective, cost_value, metric_value
from llmflow_hpo.study.view import (
    FINISHED_STATES,
    StudyView,
    duration_s,
    format_duration,
    params_text,
    search_trials,
    state_counts,
)

__all__ = ["Mode", "Progress", "as_progress", "choose_mode"]

Mode = Literal["live", "lines", "json", "quiet"]


def choose_mode(*, quiet: bool = False, as_json: bool = False, stream: TextIO | None = None) -> Mode:
    """``--quiet`` / ``--json`` first; else live on a terminal (not TERM=dumb), lines otherwise."""
    if quiet:
        return "quiet"
    if as_json:
        return "json"
    stream = stream or sys.stderr
    is_tty = hasattr(stream, "isatty") and stream.isatty()
    return "live" if is_tty and os.environ.get("TERM", "") != "dumb" else "lines"


class Progress:
    """The search's progress display and log (see the module docstring).

    The study-level events come from the worker loop (``trial_finished``), the trial-level ones from the
    training loop of the trial that runs in this process (``trial_started``, ``step``, ``evaluation``).
    """

    REDRAW_SECONDS = 0.25

    def __init__(
        self,
        mode: Mode = "lines",
        *,
        stream: TextIO | None = None,
        emit: Any = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.mode = mode
        self.stream = stream or sys.stderr
        self.emit = emit  # lines mode: where lines go instead of the stream (a log function)
        self.clock = clock
        self.metric = "metric"
        self.direction = "maximize"
        self.target: int | None = None
        self.workers = 1
        self.counts = {"complete": 0, "pruned": 0, "fail": 0}
        self.best: tuple[int, float, dict[str, Any]] | None = None  # trial number, value, params
        self.objective: CostObjective | None = None  # a quality-against-cost study's (its best: select's pick)
        self.durations: list[float] = []  # of the trials finished in this run (complete or pruned)
        # The running trial (the one of this process).
        self.trial: int | None = None
        self.trial_started_at = 0.0
        self.seen = 0
        self.total = 0
        self.loss: float | None = None
        self.last_dev: float | None = None
        self._status_shown = False
        self._last_draw = 0.0

    # -- the search ------------------------------------------------------------------------------

    def start(
        self,
        *,
        study: Any,
        target: int | None,
        metric: str,
        direction: str,
        workers: int = 1,
    ) -> None:
        """The search begins: what the study already holds counts, new trials add to it."""
        self.target, self.metric, self.direction, self.workers = target, metric, direction, workers
        view = StudyView.of(study)  # its trials, and its cost objective (read once)
        self.objective = view.objective
        trials = search_trials(view.trials)  # confirmation trials are not the search's
        self.counts = state_counts(trials, _SHOWN_STATES)
        self.best = self._best(trials)
        # Earlier trials' durations seed the estimate of the time left.
        self.durations = [
            t.duration.total_seconds() for t in trials if t.state in FINISHED_STATES and t.duration is not None
        ]

    @property
    def finished(self) -> int:
        return sum(self.counts[state.name.lower()] for state in FINISHED_STATES)

    def eta_seconds(self) -> float | None:
        """Time left: the running trial's rest (from its pace) plus the missing trials at the mean duration."""
        if self.target is None:
            return None
        missing = max(self.target - self.finished, 0)
        if missing == 0:
            return 0.0
        mean = sum(self.durations) / len(self.durations) if self.durations else None
        current_left = None
        if self.trial is not None:
            elapsed = self.clock() - self.trial_started_at
            if self.seen > 0 and self.total > 0:  # at its pace (early stopping or pruning may end it sooner)
                current_left = elapsed * (self.total - self.seen) / self.seen
            elif mean is not None:
                current_left = max(mean - elapsed, 0.0)
        per_trial = mean
        if per_trial is None and self.trial is not None and self.seen > 0 and self.total > 0:
            per_trial = (self.clock() - self.trial_started_at) * self.total / self.seen
        if per_trial is None:
            return None
        others = missing - (1 if self.trial is not None else 0)
        return (current_left or 0.0) + others * per_trial / max(self.workers, 1)

    # -- log lines -------------------------------------------------------------------------------

    def __call__(self, line: str) -> None:
        """A log line of the search."""
        if self.mode == "quiet":
            return
        if self.mode == "json":
            self._json({"event": "log", "message": line})
            return
        self._print(line)

    def warn(self, line: str) -> None:
        """A line every form shows (quiet too): something did not work and the search went on without it."""
        if self.mode == "json":
            self._json({"event": "warning", "message": line})
            return
        self._print(line)

    def _print(self, line: str) -> None:
        if self.emit is not None:
            self.emit(line)
            return
        self._clear_status()
        print(line, file=self.stream, flush=True)
        if self.mode == "live" and self.trial is not None:
            self._draw(force=True)

    def _json(self, event: dict[str, Any]) -> None:
        print(json.dumps(event, default=str), file=self.stream, flush=True)

    # -- the running trial -----------------------------------------------------------------------

    def trial_started(self, number: int, params: dict[str, Any], total_examples: int = 0) -> None:
        self.trial, self.trial_started_at = number, self.clock()
        self.seen, self.total, self.loss, self.last_dev = 0, total_examples, None, None
        if self.mode == "json":
            self._json({"event": "trial_started", "trial": number, "params": params, "examples": total_examples})
        elif self.mode != "quiet":
            self._print(f"trial {number:3d} started   {params_text(params)}")

    def step(self, number: int, examples_seen: int, total_examples: int, loss: float | None) -> None:
        """After each optimizer step of the running trial; cheap: it only redraws a few times a second."""
        self.seen, self.total = examples_seen, total_examples
        if loss is not None:
            self.loss = loss
        if self.mode == "live":
            self._draw()

    def evaluation(self, number: int, step: int, metrics: dict[str, float], train_loss: float | None) -> None:
        value = metrics.get(self.metric)
        self.last_dev = value
        if train_loss is not None:
            self.loss = train_loss
        if self.mode == "json":
            self._json(
                {"event": "evaluation", "trial": number, "step": step, "metrics": metrics, "train_loss": train_loss}
            )
        elif self.mode == "lines":
            share = f" ({100 * step / self.total:.0f}%)" if self.total else ""
            loss = f"train loss {train_loss:.4f}, " if train_loss is not None else ""
            shown = f"{value:.4f}" if value is not None else "?"
            self._print(f"trial {number:3d} step {step}/{self.total or '?'}{share}: {loss}dev {self.metric} {shown}")
        elif self.mode == "live":
            self._draw(force=True)

    def trial_finished(self, study: Any, trial: Any) -> None:
        """A trial of the study ended (here or, for the counts, anywhere: the study is read again)."""
        trials = search_trials(study.get_trials(deepcopy=False))  # confirmation trials are not the search's
        self.counts = state_counts(trials, _SHOWN_STATES)
        seconds = duration_s(trial) or 0.0
        if trial.state in FINISHED_STATES:
            self.durations.append(seconds)
        before = self.best
        self.best = self._best(trials)
        new_best = (
            self.best is not None and self.best[0] == trial.number and (before is None or before[0] != trial.number)
        )
        if trial.number == self.trial:
            self.trial = None
        if self.mode == "quiet":
            return
        eta = self.eta_seconds()
        if self.mode == "json":
            self._json(
                {
                    "event": "trial_finished",
                    "trial": trial.number,
                    "state": trial.state.name,
                    "value": metric_value(trial),
                    "seconds": round(seconds, 3),
                    "fail_reason": trial.user_attrs.get(records.FAIL_REASON),
                    "counts": self.counts,
                    "target": self.target,
                    "best": {"trial": self.best[0], "value": self.best[1], "params": self.best[2]}
                    if self.best
                    else None,
                    "eta_s": None if eta is None else round(eta, 1),
                }
            )
            return
        if trial.state == TrialState.COMPLETE:
            step = trial.user_attrs.get(records.BEST_STEP)
            outcome = f"complete  dev {self.metric}={metric_value(trial):.4f}{self._cost_text(trial)} at step {step}"
        elif trial.state == TrialState.PRUNED:
            outcome = f"pruned    at step {trial.user_attrs.get(records.PRUNED_AT_STEP, trial.last_step)}"
        else:
            outcome = f"{trial.state.name.lower():9s} {trial.user_attrs.get(records.FAIL_REASON) or ''}"
        target = f"/{self.target}" if self.target else ""
        best_text = f"best {self.best[1]:.4f} (trial {self.best[0]})" if self.best else "best -"
        eta_text = f" | ETA {format_duration(eta)}" if eta is not None and self.finished < (self.target or 0) else ""
        c = self.counts
        self._print(
            f"trial {trial.number:3d} {outcome} [{seconds:.1f}s] | finished {self.finished}{target} "
            f"(complete {c['complete']}, pruned {c['pruned']}, failed {c['fail']}) | {best_text}{eta_text}"
        )
        if new_best and self.best is not None:
            self._print(
                f"new best: trial {self.best[0]} dev {self.metric}={self.best[1]:.4f} with {params_text(self.best[2])}"
            )

    def _best(self, trials: list[Any]) -> tuple[int, float, dict[str, Any]] | None:
        """The best complete trial (``StudyView.best``: a cost study's is the one its select rule picks) as
        (number, value, params)."""
        best = StudyView(self.direction, self.metric, tuple(trials), objective=self.objective).best
        return None if best is None else (best.number, metric_value(best), dict(best.params))

    def _cost_text(self, trial: Any) -> str:
        """`` latency_ms=3.21`` for a trial of a quality-against-cost study (its second value), else nothing."""
        cost = cost_value(trial)
        return "" if cost is None or self.objective is None else f" {self.objective.attribute}={cost:.4g}"

    # -- the status line (live) ------------------------------------------------------------------

    def status_line(self, width: int = 100) -> str:
        """The live status line, at most ``width`` characters."""
        parts = []
        if self.trial is not None:
            share = self.seen / self.total if self.total else 0.0
            bar_width = 16
            filled = min(bar_width, int(share * bar_width))
            bar = "#" * filled + "-" * (bar_width - filled)
            trial = f"trial {self.trial} [{bar}] {100 * share:3.0f}% {self.seen}/{self.total or '?'}"
            if self.loss is not None:
                trial += f" loss {self.loss:.3f}"
            if self.last_dev is not None:
                trial += f" dev {self.metric} {self.last_dev:.4f}"
            parts.append(trial)
        c = self.counts
        target = f"/{self.target}" if self.target else ""
        done = f"{self.finished}{target} done"
        if c["pruned"] or c["fail"]:
            done += f" ({c['pruned']} pruned, {c['fail']} failed)"
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        parts.append(done)
        if self.best is not None:
            parts.append(f"best {self.best[1]:.4f} (#{self.best[0]})")
        line = " | ".join(parts)
        return line if len(line) <= width else line[: max(width - 1, 0)] + "…"

    def _draw(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_draw < self.REDRAW_SECONDS:
            return
        self._last_draw = now
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        width = (columns or shutil.get_terminal_size((100, 20)).columns) - 1  # a new pseudo-terminal says 0
        self.stream.write("\r\x1b[2K" + self.status_line(width))
        self.stream.flush()
        self._status_shown = True

    def _clear_status(self) -> None:
        if self._status_shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._status_shown = False

    def close(self) -> None:
        self._clear_status()


_SHOWN_STATES = ("complete", "pruned", "fail")  # what the counts of the progress show


def as_progress(log: Any) -> Progress:
    """The search's Progress: ``log`` itself when it is one, else a line-by-line one that prints through it."""
    if isinstance(log, Progress):
        return log
    return Progress("lines", emit=log)
