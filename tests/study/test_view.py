"""``study.view``: the counts, the best trial (one rule for every reader) and the formats."""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState, create_trial

from llmflow_hpo.study import view


def _study(values: list[float | None], direction: str = "maximize") -> optuna.Study:
    study = optuna.create_study(direction=direction)
    for v in values:
        if v is None:
            study.add_trial(create_trial(state=TrialState.PRUNED, intermediate_values={1: 0.1}))
        else:
            study.add_trial(create_trial(value=v))
    study.add_trial(create_trial(state=TrialState.FAIL))
    return study


def test_the_best_trial_is_optunas_and_the_earlier_on_ties() -> None:
    for direction in ("maximize", "minimize"):
        study = _study([0.5, 0.7, None, 0.3, 0.7, 0.3], direction)
        trials = study.get_trials(deepcopy=False)
        best = view.best_trial(trials, study.direction)
        assert best is not None and best.number == study.best_trial.number
        assert view.ranked(trials, direction)[0].number == best.number
        assert [t.number for t in view.ranked(trials, direction)] == sorted(
            [t.number for t in trials if t.state == TrialState.COMPLETE],
            key=lambda n: ((-1 if direction == "maximize" else 1) * trials[n].value, n),
        )
    assert view.best_trial(_study([None]).get_trials(), "maximize") is None


def test_a_study_view_counts_every_state() -> None:
    study = _study([0.5, None, math.inf])
    seen = view.StudyView.of(study)
    assert seen.counts == {"running": 0, "complete": 2, "pruned": 1, "fail": 1, "waiting": 0}
    assert list(seen.counts) == list(view.ALL_STATES) and seen.finished == 3
    assert seen.best is not None and seen.best.value == 0.5  # a non-finite value is never the best
    assert seen.metric == "value" and seen.direction == "maximize"
    assert view.state_counts(seen.trials, ("fail", "complete")) == {"fail": 1, "complete": 2}


def test_formats() -> None:
    assert view.format_duration(3725) == "1h02m" and view.format_duration(None) == "?"
    assert view.format_seconds(65) == "1 min 5 s" and view.format_seconds(None) == "-"
    assert (
        view.format_value(True) == "yes" and view.format_value(2e-5) == "2e-05" and view.format_value(0.5) == "0.5000"
    )
    assert view.params_text({"learning_rate": 0.000123456, "batch_size": 16}) == "learning_rate=0.000123, batch_size=16"
