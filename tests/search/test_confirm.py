"""The confirmation stage (``llmflow-hpo confirm``): the best configurations re-run over seeds, as trials of the
same study, pruned by WilcoxonPruner, kept apart from the search, and what retrain-best and the report make of it."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from llmflow_hpo.errors import ConfigError
from llmflow_hpo.study import records

REPO = Path(__file__).resolve().parents[2]
QUIET = {"log": lambda _: None}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_confirm_runs_top_n_by_k_seeds_and_retrain_best_trains_the_winner(tiny_cfg, tmp_path):
    from llmflow_hpo.deliver.retrain import retrain_best
    from llmflow_hpo.search.backends import run_search
    from llmflow_hpo.search.confirm import run_confirmation
    from llmflow_hpo.study.storage import finished_trials, load_study
    from llmflow_hpo.study.view import StudyView
    from llmflow_hpo.views.report import build_report

    cfg, space, raw = tiny_cfg({"n_trials": 3, "train": {"epochs": 1}})
    run_search(cfg, space, raw, **QUIET)
    config = str(tmp_path / "study.yaml")
    run = cli("confirm", config, "--top", "2", "--seeds", "2", "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    study = load_study(cfg.study_name, cfg.storage)
    view = StudyView.of(study)
    search_best = view.best
    assert out["ran"] == 2 and len(out["rows"]) == 2 and len(view.confirmations) == 2
    assert finished_trials(study) == 3 and view.counts["complete"] == 3  # the search's own count
    assert search_best.number < 3 and not search_best.user_attrs.get(records.CONFIRMS)
    ranked = sorted((t for t in view.trials if t.number < 3), key=lambda t: (-t.value, t.number))
    for row, t in zip(out["rows"], view.confirmations, strict=True):
        attrs = t.user_attrs
        assert attrs[records.CONFIRM_SEEDS] == [cfg.seed + 1, cfg.seed + 2] == row["seeds"]
        assert len(attrs[records.CONFIRM_SCORES]) == 2 and t.intermediate_values == dict(enumerate(row["scores"]))
        assert t.value == pytest.approx(sum(row["scores"]) / 2) == attrs[records.CONFIRM_MEAN]
        assert attrs[records.CONFIRM_SELECT] == "mean" and attrs[records.CONFIRM_LCB] <= attrs[records.CONFIRM_MEAN]
        assert t.params == study.trials[attrs[records.CONFIRMS]].params
    assert [r["confirms"] for r in out["rows"]] == [t.number for t in ranked[:2]]
    winner = max(out["rows"], key=lambda r: (r["mean"], -r["trial"]))
    assert out["winner"]["trial"] == winner["trial"] and out["differs"] == (winner["confirms"] != search_best.number)

    cfg.confirm.top, cfg.confirm.seeds = 2, 2
    assert run_confirmation(cfg, space, raw, source=config, **QUIET)["ran"] == 0
    assert len(load_study(cfg.study_name, cfg.storage).trials) == 5  # a rerun adds nothing

    model, said = tmp_path / "model", []
    retrained = retrain_best(study_name=cfg.study_name, storage=cfg.storage, output_dir=model, log=said.append)
    assert retrained.trial_number == winner["confirms"] and retrained.reproduced is True
    spread = f"dev f1 {winner['mean']:.4f} +- {winner['std']:.4f} over 2 seeds (seeds {cfg.seed + 1}, {cfg.seed + 2})"
    assert spread in (model / "README.md").read_text() and any(spread in line for line in said)
    assert json.loads((model / "metrics.json").read_text())["confirmation"]["trial"] == winner["trial"]

    report = build_report(study, tmp_path / "report", **QUIET)
    assert report.best_number == search_best.number and report.counts["complete"] == 3
    assert report.confirmation["winner"]["trial"] == winner["trial"]
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Confirmation over seeds" in page and "Confirmed winner: trial" in page


def _fabricated_study(tiny_cfg, monkeypatch, scores):
    """A study made by llmflow-hpo holding three complete search trials; seed runs are scripted by ``scores``
    (configuration's learning rate -> seed -> score, or an exception to raise), no training."""
    from llmflow_hpo.search import confirm
    from llmflow_hpo.search.strategy import build_pruner, build_sampler
    from llmflow_hpo.study.storage import open_study

    cfg, space, raw = tiny_cfg({"confirm": {"seeds": 5}})
    study = open_study(cfg, raw, sampler=build_sampler(cfg, space), pruner=build_pruner(cfg, 48, space), data_report=[])
    dists = {"learning_rate": FloatDistribution(5e-4, 5e-3, log=True), "batch_size": CategoricalDistribution([8, 16])}
    for value, lr in ((0.95, 1e-3), (0.90, 2e-3), (0.85, 3e-3)):  # the single-run ranking: 1e-3 first
        params = {"learning_rate": lr, "batch_size": 8}
        study.add_trial(create_trial(value=value, params=params, distributions=dists, user_attrs={"best_step": 24}))
    calls: list[tuple[float, int]] = []

    def train_seed(cfg, params, features, seed, say, label):
        calls.append((params["learning_rate"], seed))
        outcome = scores[params["learning_rate"]][seed - cfg.seed - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(confirm, "_train_seed", train_seed)
    monkeypatch.setattr("llmflow_hpo.search.driver.open_features", lambda cfg, say, data=None: None)
    return cfg, space, raw, study, calls


def test_wilcoxon_prunes_a_clearly_worse_configuration_and_an_interrupted_one_resumes(tiny_cfg, monkeypatch):
    from optuna_dashboard import get_note

    from llmflow_hpo.deliver.retrain import _confirmed_or_best
    from llmflow_hpo.search.confirm import run_confirmation
    from llmflow_hpo.study.note import CONFIRMATION_HEADING
    from llmflow_hpo.study.view import StudyView

    scores = {
        1e-3: [0.80, 0.81, 0.79, 0.80, 0.80],  # the single-run winner does not hold up
        2e-3: [0.90, 0.91, KeyboardInterrupt(), 0.92, 0.90],
        3e-3: [0.50, 0.52, 0.51, 0.49, 0.50],  # clearly worse than the best confirmed on every seed
    }
    cfg, space, raw, study, calls = _fabricated_study(tiny_cfg, monkeypatch, scores)
    with pytest.raises(KeyboardInterrupt):
        run_confirmation(cfg, space, raw, source="test", **QUIET)
    interrupted = study.trials[-1]
    assert (
        interrupted.state == TrialState.FAIL and interrupted.user_attrs[records.FAIL_REASON] == "interrupted (SIGINT)"
    )
    assert interrupted.user_attrs[records.CONFIRM_SCORES] == [0.90, 0.91]

    scores[2e-3][2] = 0.89
    calls.clear()
    summary = run_confirmation(cfg, space, raw, source="test", **QUIET)
    assert (2e-3, cfg.seed + 1) not in calls and (2e-3, cfg.seed + 3) in calls  # resumed after its 2 seeds
    rows = {r["confirms"]: r for r in summary["rows"]}
    assert rows[1]["state"] == "complete" and rows[1]["scores"] == [0.90, 0.91, 0.89, 0.92, 0.90]
    assert study.trials[rows[1]["trial"]].user_attrs[records.RETRY_OF] == interrupted.number
    assert rows[2]["state"] == "pruned" and len(rows[2]["scores"]) == 4  # 4 pairs: p = 1/16 < 0.1
    assert summary["winner"]["confirms"] == 1 and summary["single_run"]["trial"] == 0 and summary["differs"]

    note = get_note(study)  # the dashboard's Note panel: the study's note, then the confirmation table
    assert note.startswith(f"## {cfg.study_name}:") and note.count(CONFIRMATION_HEADING) == 1
    assert f"| {rows[2]['trial']} | 2 | 0.8500 | pruned | 0.5000, 0.5200, 0.5100, 0.4900 |" in note
    assert f"**Confirmed winner**: trial {rows[1]['trial']} (search trial 1), dev f1 0.9040 +- 0.0114" in note
    assert "The single-run winner, search trial 0, is another configuration." in note
    view = StudyView.of(study)
    assert view.best.number == 0 and view.counts["complete"] == 3  # the search's ranking is unchanged
    source, row = _confirmed_or_best(view, cfg.study_name, cfg.metric, QUIET["log"])
    assert source.number == 1 and row["mean"] == pytest.approx(0.904)
    calls.clear()
    assert run_confirmation(cfg, space, raw, source="test", **QUIET)["ran"] == 0 and not calls


def test_the_adapter_compares_with_the_best_confirmation_trial_not_the_best_search_trial():
    from llmflow_hpo.search.confirm import ConfirmationPruner

    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(value=0.99, intermediate_values={600: 0.9, 1200: 0.99}))  # a search trial
    study.add_trial(
        create_trial(value=0.9, intermediate_values=dict(enumerate([0.9, 0.91, 0.89, 0.9])), user_attrs={"confirms": 0})
    )
    worse = study.ask()
    for step, value in enumerate([0.5, 0.52, 0.51, 0.49]):
        worse.report(value, step)
    frozen = study.trials[-1]
    assert ConfirmationPruner(p_threshold=0.1).prune(study, frozen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        plain = optuna.pruners.WilcoxonPruner(p_threshold=0.1)
    with pytest.warns(UserWarning):  # optuna's own pruner pairs nothing: the best trial's steps are examples seen
        assert not plain.prune(study, frozen)
    assert not ConfirmationPruner(p_threshold=0.01).prune(study, frozen)  # 4 pairs cannot reach p < 0.01


def test_seed_stats_lcb_is_the_one_sided_t_bound():
    from scipy import stats

    from llmflow_hpo.search.confirm import seed_stats

    scores = [0.8, 0.82, 0.79, 0.81, 0.83]
    mean, sd = sum(scores) / 5, stats.tstd(scores)
    got = seed_stats(scores, "maximize", 0.9)
    assert got[records.CONFIRM_MEAN] == pytest.approx(mean) and got[records.CONFIRM_STD] == pytest.approx(sd)
    assert got[records.CONFIRM_LCB] == pytest.approx(mean - stats.t.ppf(0.9, 4) * sd / 5**0.5)
    assert seed_stats(scores, "minimize", 0.9)[records.CONFIRM_LCB] > mean  # the losing side of a loss


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"seeds": 1}, "confirm.seeds: must be >= 2"),
        ({"top": 0}, "confirm.top: must be >= 1"),
        ({"confidence": 1.0}, "confirm.confidence: must be in [0.5, 1)"),
        ({"p_threshold": 0}, "confirm.p_threshold: must be in (0, 1)"),
        ({"select": "median"}, "confirm.select"),
    ],
)
def test_bad_confirm_values_are_refused(section, message):
    from conftest import raw

    from llmflow_hpo.config.study import config_from_dict

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(raw(confirm=section), source="s.yaml")


def test_confirm_refuses_bad_seeds_in_one_line(write_study, tmp_path):
    run = cli("confirm", str(write_study()), "--seeds", "1", cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"llmflow-hpo: error: {tmp_path / 'study.yaml'}: confirm.seeds: must be >= 2 (a spread needs two runs)"
    ]


def test_a_killed_confirm_leaves_a_trial_the_next_one_fails_and_continues(tiny_cfg, monkeypatch):
    """SIGKILL: the confirmation trial stays RUNNING; its process is gone, so the next confirm fails it and
    continues the configuration from the seeds it finished."""
    import socket

    from llmflow_hpo.search.confirm import run_confirmation
    from llmflow_hpo.study.optuna_private import create_trial as store

    scores = {lr: [0.8, 0.8, 0.81, 0.79, 0.8] for lr in (1e-3, 2e-3, 3e-3)}
    cfg, space, raw, study, calls = _fabricated_study(tiny_cfg, monkeypatch, scores)
    cfg.confirm.top = 1
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    attrs = {
        records.CONFIRMS: 0,
        records.CONFIRM_SEEDS: [cfg.seed + i for i in range(1, 6)],
        records.CONFIRM_SCORES: [0.8, 0.8],
        records.CONFIRM_SELECT: "mean",
        records.CONFIRM_CONFIDENCE: 0.9,
        records.WORKER: f"{socket.gethostname()}:{gone.stdout.strip()}",
    }
    source = study.trials[0]
    killed, _ = store(
        study,
        create_trial(
            state=TrialState.RUNNING, params=source.params, distributions=source.distributions, user_attrs=attrs
        ),
    )
    summary = run_confirmation(cfg, space, raw, source="test", **QUIET)
    dead = study.trials[killed]
    assert dead.state == TrialState.FAIL and dead.user_attrs[records.FAIL_REASON] == "its confirm process died"
    assert [seed - cfg.seed for _, seed in calls] == [3, 4, 5]
    assert summary["rows"][0]["state"] == "complete" and study.trials[-1].user_attrs[records.RETRY_OF] == killed


def test_confirm_refuses_a_cost_config_before_the_storage_and_a_stored_cost_study_in_one_line(tiny_cfg):
    from llmflow_hpo.errors import StorageError
    from llmflow_hpo.search.confirm import run_confirmation

    cfg, space, raw = tiny_cfg({"objective": {"cost": "params"}})
    with pytest.raises(ConfigError, match=r"objective\.cost: confirm re-runs single-objective studies only"):
        run_confirmation(cfg, space, raw, source="s.yaml", **QUIET)
    assert not Path(str(cfg.storage).removeprefix("sqlite:///")).exists()  # refused before the storage opened
    cfg, space, raw = tiny_cfg()
    optuna.create_study(study_name=cfg.study_name, storage=cfg.storage, directions=["maximize", "minimize"])
    with pytest.raises(StorageError, match="has direction maximize, minimize; the config says maximize dev f1"):
        run_confirmation(cfg, space, raw, source="s.yaml", **QUIET)


def test_a_rerun_does_not_confirm_a_configuration_again_when_a_later_search_trial_found_it_again(tiny_cfg, monkeypatch):
    """A categorical space draws the same configuration twice: the later, luckier draw ranks first on the next
    confirm, and the configuration confirmed under the earlier trial is not run again."""
    from llmflow_hpo.search.confirm import run_confirmation

    scores = {lr: [0.8, 0.8, 0.81, 0.79, 0.8] for lr in (1e-3, 2e-3, 3e-3)}
    cfg, space, raw, study, calls = _fabricated_study(tiny_cfg, monkeypatch, scores)
    cfg.confirm.top = 1
    assert run_confirmation(cfg, space, raw, source="test", **QUIET)["ran"] == 1
    again = study.trials[0]  # the same configuration, searched again with a better single run
    study.add_trial(create_trial(value=0.97, params=again.params, distributions=again.distributions))
    calls.clear()
    summary = run_confirmation(cfg, space, raw, source="test", **QUIET)
    assert summary["ran"] == 0 and not calls and len(summary["rows"]) == 1
    assert summary["single_run"]["trial"] == study.trials[-1].number and summary["differs"] is False  # the same one


def test_a_configuration_another_confirm_started_meanwhile_is_left_to_it(tiny_cfg, monkeypatch):
    """Two confirm processes at once: what each runs is decided configuration by configuration, so a
    configuration the other one started while this one trained is skipped, not run twice."""
    import os
    import socket

    from llmflow_hpo.search import confirm
    from llmflow_hpo.search.confirm import run_confirmation
    from llmflow_hpo.study.optuna_private import create_trial as store

    scores = {lr: [0.8, 0.8, 0.81, 0.79, 0.8] for lr in (1e-3, 2e-3, 3e-3)}
    cfg, space, raw, study, calls = _fabricated_study(tiny_cfg, monkeypatch, scores)
    cfg.confirm.top = 2
    scripted = confirm._train_seed

    def train_seed(cfg, params, features, seed, say, label):
        if not calls:  # while this one trains its first configuration, another process starts the second
            other = study.trials[1]
            attrs = {
                records.CONFIRMS: 1,
                records.CONFIRM_SEEDS: [cfg.seed + i for i in range(1, 6)],
                records.CONFIRM_SELECT: "mean",
                records.CONFIRM_CONFIDENCE: 0.9,
                records.WORKER: f"{socket.gethostname()}:{os.getpid()}",  # alive
            }
            template = create_trial(
                state=TrialState.RUNNING, params=other.params, distributions=other.distributions, user_attrs=attrs
            )
            store(study, template)
        return scripted(cfg, params, features, seed, say, label)

    monkeypatch.setattr(confirm, "_train_seed", train_seed)
    summary = run_confirmation(cfg, space, raw, source="test", **QUIET)
    assert summary["ran"] == 1 and {lr for lr, _ in calls} == {1e-3}


def test_the_adapter_prunes_the_higher_loss_of_a_minimized_study_and_spares_the_lower():
    from llmflow_hpo.search.confirm import ConfirmationPruner

    study = optuna.create_study(direction="minimize")
    confirmed = dict(enumerate([0.30, 0.31, 0.29, 0.30]))
    study.add_trial(create_trial(value=0.3, intermediate_values=confirmed, user_attrs={records.CONFIRMS: 0}))
    for losses, pruned in (([0.50, 0.52, 0.51, 0.49], True), ([0.20, 0.21, 0.19, 0.20], False)):
        trial = study.ask()
        for step, loss in enumerate(losses):
            trial.report(loss, step)
        assert ConfirmationPruner(p_threshold=0.1).prune(study, study.trials[-1]) is pruned
        study.tell(trial, state=TrialState.FAIL)
