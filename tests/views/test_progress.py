"""What `search` shows while it runs: the live status line on a terminal, plain lines in a pipe, JSON events
with --json, nothing but the result with --quiet; and the estimate of the time left."""

from __future__ import annotations

import datetime
import io
import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from llmflow_hpo.study.view import format_duration
from llmflow_hpo.views.progress import Progress, choose_mode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _finish(study: optuna.Study, value: float | None, seconds: float, state=TrialState.COMPLETE):
    """Add one finished trial to ``study`` and return it as stored, with its duration."""
    start = datetime.datetime(2026, 1, 2)
    trial = create_trial(
        state=state,
        value=value,
        params={"learning_rate": 3e-4},
        distributions={"learning_rate": FloatDistribution(1e-5, 1e-2, log=True)},
        user_attrs={"best_step": 200} if state == TrialState.COMPLETE else {"pruned_at_step": 100},
    )
    trial.datetime_start, trial.datetime_complete = start, start + datetime.timedelta(seconds=seconds)
    study.add_trial(trial)
    return study.get_trials()[-1]


def test_the_time_left_is_the_running_trial_rest_plus_the_missing_trials_at_their_mean() -> None:
    clock = Clock()
    progress = Progress("lines", stream=io.StringIO(), clock=clock)
    study = optuna.create_study(direction="maximize")
    progress.start(study=study, target=4, metric="f1", direction="maximize")
    assert progress.eta_seconds() is None  # nothing to go by yet
    progress.trial_started(0, {"learning_rate": 1e-4}, total_examples=1000)
    clock.now += 10
    progress.step(0, 250, 1000, 1.5)  # a quarter in 10 s: 30 s left of it, and 3 more trials of 40 s
    assert progress.eta_seconds() == pytest.approx(30 + 3 * 40)
    progress.trial_finished(study, _finish(study, 0.5, 40.0))
    progress.trial_finished(study, _finish(study, None, 20.0, TrialState.PRUNED))  # (another worker's)
    # Two finished (mean 30 s), none running here: two more at 30 s each.
    assert progress.eta_seconds() == pytest.approx(60)
    progress.workers = 2
    assert progress.eta_seconds() == pytest.approx(30)
    assert format_duration(3725) == "1h02m" and format_duration(65) == "1m05s" and format_duration(None) == "?"


def test_lines_show_starts_evaluations_ends_and_each_new_best_with_its_parameters() -> None:
    out = io.StringIO()
    progress = Progress("lines", stream=out, clock=Clock())
    study = optuna.create_study(direction="maximize")
    progress.start(study=study, target=2, metric="f1", direction="maximize")
    progress.trial_started(0, {"learning_rate": 3e-4, "batch_size": 16}, total_examples=200)
    progress.step(0, 100, 200, 0.9)  # no line per step
    progress.evaluation(0, 100, {"f1": 0.61, "precision": 0.6}, 0.9)
    progress.trial_finished(study, _finish(study, 0.61, 12.0))
    progress("a log line")
    lines = out.getvalue().splitlines()
    assert lines[0] == "trial   0 started   learning_rate=0.0003, batch_size=16"
    assert lines[1] == "trial   0 step 100/200 (50%): train loss 0.9000, dev f1 0.6100"
    assert lines[2].startswith("trial   0 complete  dev f1=0.6100 at step 200 [12.0s] | finished 1/2")
    assert "(complete 1, pruned 0, failed 0) | best 0.6100 (trial 0) | ETA 12s" in lines[2]
    assert lines[3] == "new best: trial 0 dev f1=0.6100 with learning_rate=0.0003"
    assert lines[4] == "a log line"
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_live_redraws_one_status_line_and_prints_events_above_it() -> None:
    out = io.StringIO()
    clock = Clock()
    progress = Progress("live", stream=out, clock=clock)
    study = optuna.create_study(direction="maximize")
    progress.start(study=study, target=3, metric="f1", direction="maximize")
    progress.trial_started(0, {"learning_rate": 3e-4}, total_examples=400)
    for seen in range(8, 408, 8):
        clock.now += 0.05
        progress.step(0, seen, 400, 1.0)
    draws = out.getvalue().count("\r\x1b[2K")
    assert 5 <= draws <= 15  # redrawn a few times a second, not at every step (50 steps in 2.5 s)
    progress.evaluation(0, 200, {"f1": 0.42}, 0.8)
    status = progress.status_line(200)
    assert status.startswith("trial 0 [################] 100% 400/400 loss 0.800 dev f1 0.4200")
    assert "0/3 done" in status and "ETA" in status
    progress("a log line")  # clears the status line, prints, draws it again
    assert "\r\x1b[2Ka log line\n\r\x1b[2Ktrial 0 [" in out.getvalue()
    assert len(progress.status_line(40)) == 40  # cut to the terminal's width


def test_json_events_and_quiet() -> None:
    out = io.StringIO()
    progress = Progress("json", stream=out, clock=Clock())
    study = optuna.create_study(direction="maximize")
    progress.start(study=study, target=1, metric="f1", direction="maximize")
    progress.trial_started(0, {"learning_rate": 3e-4}, total_examples=200)
    progress.evaluation(0, 100, {"f1": 0.5}, 0.7)
    progress.trial_finished(study, _finish(study, 0.5, 3.0))
    progress("log")
    progress.warn("tracking: broken")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["trial_started", "evaluation", "trial_finished", "log", "warning"]
    assert events[1] == {"event": "evaluation", "trial": 0, "step": 100, "metrics": {"f1": 0.5}, "train_loss": 0.7}
    assert (
        events[2]["state"] == "COMPLETE" and events[2]["best"]["value"] == 0.5 and events[2]["counts"]["complete"] == 1
    )

    out = io.StringIO()
    quiet = Progress("quiet", stream=out)
    quiet.start(study=study, target=1, metric="f1", direction="maximize")
    quiet.trial_started(1, {}, 10)
    quiet.evaluation(1, 5, {"f1": 0.1}, None)
    quiet("log")
    quiet.warn("tracking: broken")
    assert out.getvalue() == "tracking: broken\n"


def test_the_mode_follows_the_flags_and_the_terminal(monkeypatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "xterm")
    assert choose_mode(stream=Tty()) == "live"
    assert choose_mode(stream=io.StringIO()) == "lines"
    assert choose_mode(quiet=True, stream=Tty()) == "quiet"
    assert choose_mode(as_json=True, stream=Tty()) == "json"
    monkeypatch.setenv("TERM", "dumb")
    assert choose_mode(stream=Tty()) == "lines"


def _run_on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal; returns its exit code, stdout and what the terminal got."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmflow_hpo", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**os.environ, "TERM": "xterm"},
    )
    os.close(slave)
    received = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the other end closed
                break
            if not data:
                break
            received += data
        elif proc.poll() is not None:
            break
    os.close(master)
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    return proc.wait(timeout=60), stdout, received.decode(errors="replace")


@pytest.mark.slow
def test_search_on_a_terminal_shows_the_live_line_and_in_a_pipe_plain_lines(write_study, tmp_path: Path) -> None:
    config = write_study({"n_trials": 2, "train": {"epochs": 2}})
    code, stdout, terminal = _run_on_a_terminal(["search", str(config)], tmp_path)
    assert code == 0, terminal[-3000:]
    assert "\r\x1b[2Ktrial 0 [" in terminal and "ETA" in terminal and "loss " in terminal
    assert "trial   1 complete" in terminal and "best trial" in stdout

    # In a pipe, --quiet: the result on stdout and nothing on stderr; --json: one JSON event a line.
    quiet = subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", "search", str(config), "--set", "n_trials=3", "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert quiet.returncode == 0 and quiet.stderr == "" and "3 complete" in quiet.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", "search", str(config), "--set", "n_trials=4", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    events = [json.loads(line) for line in as_json.stderr.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("trial_started") == 1 and kinds.count("trial_finished") == 1
    assert kinds.count("evaluation") == 4  # two epochs, two evaluations each
    assert json.loads(as_json.stdout)["counts"]["complete"] == 4
