"""Studies end to end in process: what is stored, pruning, failures, memory release and resume."""

from __future__ import annotations

import gc
import os

import optuna
import pytest
import torch
from optuna.trial import TrialState

from llmflow_hpo.data.features import prepare_features
from llmflow_hpo.errors import StorageError
from llmflow_hpo.search.backends import run_search
from llmflow_hpo.search.objective import Objective
from llmflow_hpo.study.storage import load_study

QUIET = {"log": lambda _: None}


def test_study_stores_config_versions_and_trial_metrics(tiny_cfg):
    cfg, space, raw = tiny_cfg({"n_trials": 2})
    summary = run_search(cfg, space, raw, **QUIET)
    assert summary.counts["complete"] == 2 and summary.ran == 2
    study = load_study(cfg.study_name, cfg.storage)
    assert study.user_attrs["config"]["train"]["epochs"] == 2
    assert study.user_attrs["search_space"] == raw
    assert set(study.user_attrs["versions"]) >= {"llmflow-hpo", "optuna", "torch", "transformers"}
    for trial in study.trials:
        attrs = trial.user_attrs
        assert trial.value == attrs["dev_f1"]
        assert {"dev_precision", "dev_recall", "dev_accuracy", "dev_loss"} <= set(attrs)
        for key in ("best_step", "train_time_s", "examples_per_second", "n_params", "peak_memory_mb", "seed"):
            assert key in attrs, key
        assert attrs["setup_s"] > 0 and attrs["train_s"] > 0 and attrs["eval_s"] > 0
        assert attrs["train_s"] + attrs["eval_s"] <= attrs["train_time_s"]
        assert attrs["best_step"] in trial.intermediate_values
        assert trial.intermediate_values[attrs["best_step"]] == trial.value
        assert trial.value == max(trial.intermediate_values.values())  # best, not last
        assert len(trial.intermediate_values) == 4  # 2 epochs x 2 evaluations, steps in examples seen


def test_median_pruner_stops_a_worse_trial_at_the_same_amount_of_training(tiny_cfg, monkeypatch):
    options = {"n_startup_trials": 1, "n_warmup_steps": 0}
    pruner = {"name": "median", "options": options, "patience": None}  # the median pruner alone
    cfg, space, raw = tiny_cfg({"n_trials": 3, "pruner": pruner})
    scores = iter([0.5, 0.6, 0.7, 0.8, 0.1, 0.9, 0.9, 0.9, 0.9])
    monkeypatch.setattr("llmflow_hpo.recipe.train.evaluate", lambda *a, **k: ({"f1": next(scores), "loss": 1.0}, []))
    run_search(cfg, space, raw, **QUIET)
    trials = load_study(cfg.study_name, cfg.storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    first_step = min(trials[0].intermediate_values)
    assert trials[1].intermediate_values == {first_step: 0.1}
    assert trials[1].user_attrs["pruned_at_step"] == first_step
    assert trials[1].user_attrs["dev_f1"] == 0.1  # a pruned trial still shows what it reached
    for t in trials:  # what each trial ran with, pruned ones too
        assert (t.user_attrs["precision"], t.user_attrs["group_by_length"], t.user_attrs["tf32"]) == (
            "fp32",
            True,
            False,
        )
    # batch sizes differ between trials, steps do not: they count training examples seen
    assert set(trials[2].intermediate_values) == set(trials[0].intermediate_values)


def test_by_default_the_median_pruner_waits_for_the_first_epoch(tiny_cfg, monkeypatch):
    pruner = {"name": "median", "options": {"n_startup_trials": 1}, "patience": None}
    cfg, space, raw = tiny_cfg({"n_trials": 2, "pruner": pruner})
    scores = iter([0.5, 0.6, 0.7, 0.8, 0.1, 0.05, 0.9, 0.9])
    monkeypatch.setattr("llmflow_hpo.recipe.train.evaluate", lambda *a, **k: ({"f1": next(scores), "loss": 1.0}, []))
    run_search(cfg, space, raw, **QUIET)
    second = load_study(cfg.study_name, cfg.storage).trials[1]
    # 48 training examples: worse than the median at 24 (half an epoch) is not pruned yet, at 48 it is.
    assert second.state == TrialState.PRUNED and second.intermediate_values == {24: 0.1, 48: 0.05}


@pytest.mark.parametrize(
    ("second", "evaluations", "state"),
    [([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 6, "COMPLETE"), ([0.1, 0.3, 0.2, 0.2, 0.9, 0.9], 4, "PRUNED")],
)
def test_by_default_a_trial_still_improving_is_not_pruned_for_being_behind(
    tiny_cfg, monkeypatch, second, evaluations, state
):
    """pruner.patience 1 (optuna's PatientPruner): behind the median at every evaluation but climbing, the trial
    runs on; once its last two evaluations are both below its earlier best, the median pruner judges it."""
    pruner = {"name": "median", "options": {"n_startup_trials": 1}}
    cfg, space, raw = tiny_cfg({"n_trials": 2, "pruner": pruner, "train": {"epochs": 3}})
    scores = iter([0.5, 0.6, 0.7, 0.8, 0.9, 1.0, *second])
    monkeypatch.setattr("llmflow_hpo.recipe.train.evaluate", lambda *a, **k: ({"f1": next(scores), "loss": 1.0}, []))
    run_search(cfg, space, raw, **QUIET)
    trial = load_study(cfg.study_name, cfg.storage).trials[1]
    assert (trial.state.name, len(trial.intermediate_values)) == (state, evaluations)


def test_diverged_trial_fails_with_its_reason_and_the_study_goes_on(tiny_cfg, monkeypatch):
    from llmflow_hpo.recipe import train

    cfg, space, raw = tiny_cfg({"n_trials": 2})
    real_loss, calls = train.loss_fn, {"n": 0}

    def nan_in_first_run(logits, labels, hp, weights):
        calls["n"] += 1
        loss = real_loss(logits, labels, hp, weights)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr("llmflow_hpo.recipe.train.loss_fn", nan_in_first_run)
    summary = run_search(cfg, space, raw, **QUIET)
    trials = load_study(cfg.study_name, cfg.storage).trials
    assert trials[0].state == TrialState.FAIL
    assert trials[0].value is None  # never a fake metric
    assert trials[0].user_attrs["fail_reason"].startswith("diverged: non-finite training loss")
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert summary.counts == {**summary.counts, "complete": 2, "fail": 1}


def test_a_non_finite_dev_metric_fails_the_trial_naming_the_metric_and_its_value(tiny_cfg, monkeypatch):
    # The same rule as on Ray (reporting.check_finite, which both reporters call): FAIL with the reason, never PRUNED.
    cfg, space, raw = tiny_cfg({"n_trials": 1})
    scores = iter([0.5, float("nan"), 0.6, 0.7, 0.8, 0.9])
    monkeypatch.setattr("llmflow_hpo.recipe.train.evaluate", lambda *a, **k: ({"f1": next(scores), "loss": 1.0}, []))
    summary = run_search(cfg, space, raw, **QUIET)
    trials = load_study(cfg.study_name, cfg.storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["fail_reason"] == "dev f1 is nan at step 48" and trials[0].value is None
    assert summary.counts == {**summary.counts, "complete": 1, "fail": 1, "pruned": 0}


def test_each_trial_draws_its_point_under_the_study_lock(tiny_cfg, monkeypatch):
    """QMC numbers its points in the study (read, then write the next number): two workers drawing at once
    outside the lock could take the same number. Every draw of the sampler happens while the lock is held."""
    from llmflow_hpo.study.lock import StudyLock

    held, draws = {"now": False}, []
    acquire, release = StudyLock.acquire, StudyLock.release

    def acquired(self):
        acquire(self)
        held["now"] = True

    def released(self):
        held["now"] = False
        release(self)

    monkeypatch.setattr(StudyLock, "acquire", acquired)
    monkeypatch.setattr(StudyLock, "release", released)
    for method in ("sample_relative", "sample_independent"):
        real = getattr(optuna.samplers.QMCSampler, method)

        def recorded(self, *args, _real=real, _method=method):
            draws.append((_method, held["now"]))
            return _real(self, *args)

        monkeypatch.setattr(optuna.samplers.QMCSampler, method, recorded)
    sampler = {"name": "qmc", "defaults_first": False}  # QMC's own first trial draws independently
    cfg, space, raw = tiny_cfg({"n_trials": 3, "sampler": sampler, "train": {"epochs": 1}})
    run_search(cfg, space, raw, **QUIET)
    trials = load_study(cfg.study_name, cfg.storage).trials
    assert len({(t.params["learning_rate"], t.params["batch_size"]) for t in trials}) == 3
    assert {method for method, _ in draws} == {"sample_relative", "sample_independent"}  # trial 0: independent
    assert all(under_lock for _, under_lock in draws), draws


def test_out_of_memory_fails_the_trial_with_its_reason(tiny_cfg, monkeypatch):
    from llmflow_hpo.recipe import train

    cfg, space, raw = tiny_cfg({"n_trials": 1})
    real_loss, calls = train.loss_fn, {"n": 0}

    def oom_once(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(*args)

    monkeypatch.setattr("llmflow_hpo.recipe.train.loss_fn", oom_once)
    run_search(cfg, space, raw, **QUIET)
    trials = load_study(cfg.study_name, cfg.storage).trials
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"].startswith("out of memory on cpu")
    assert trials[1].state == TrialState.COMPLETE


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_no_memory_carried_from_trial_to_trial(tiny_cfg):
    # 128-wide: each trial holds ~17 MB of weights plus twice that of optimizer state, so a leak shows.
    cfg, space, _ = tiny_cfg(
        {
            "n_trials": 10,
            "data": {"limit_train": 16, "limit_dev": 8},
            "model": {"config_overrides": {"hidden_size": 128}},
            "train": {"epochs": 1, "evals_per_epoch": 1},
        }
    )
    features = prepare_features(cfg, **QUIET)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    from transformers import PreTrainedModel

    heavy = (PreTrainedModel, torch.nn.Parameter, torch.optim.Optimizer, torch.utils.data.DataLoader)

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, heavy))

    # What earlier tests in this process left alive is not the trials' doing (onnxscript's rewrite rules, for
    # one, keep the last graph they matched, and its weights, after an in-process ONNX export).
    before, live_modules, rss = live(), [], []

    def after_trial(study, trial):
        live_modules.append(live() - before)
        rss.append(_rss_mb())

    study.optimize(Objective(cfg, space, features), n_trials=10, callbacks=[after_trial])
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert live_modules == [0] * 10
    assert rss[-1] - rss[1] < 60, rss  # ten trials of ~50 MB each would add hundreds of MB if kept


def test_rerun_continues_the_study_up_to_n_trials(tiny_cfg):
    cfg, space, raw = tiny_cfg({"n_trials": 2})
    run_search(cfg, space, raw, **QUIET)
    cfg3, space3, raw3 = tiny_cfg({"n_trials": 3})
    summary = run_search(cfg3, space3, raw3, **QUIET)
    assert summary.ran == 1
    study = load_study(cfg.study_name, cfg.storage)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert summary.ran == 1 and run_search(cfg3, space3, raw3, **QUIET).ran == 0
    study = load_study(cfg.study_name, cfg.storage)
    assert len(study.trials) == 3
    assert study.user_attrs["config"]["n_trials"] == 3  # workers joining later run towards the new target


def test_a_seeded_sampler_does_not_repeat_earlier_parameters_on_rerun(tiny_cfg):
    cfg, space, raw = tiny_cfg({"n_trials": 2, "train": {"epochs": 1}})
    run_search(cfg, space, raw, **QUIET)
    cfg4, space4, raw4 = tiny_cfg({"n_trials": 4, "train": {"epochs": 1}})
    run_search(cfg4, space4, raw4, **QUIET)
    rates = [t.params["learning_rate"] for t in load_study(cfg.study_name, cfg.storage).trials]
    # A sampler seeded once per process would draw trials 2 and 3 exactly as trials 0 and 1.
    assert len(set(rates)) == 4


def test_new_study_leaves_the_stored_one_untouched(tiny_cfg):
    cfg, space, raw = tiny_cfg({"n_trials": 1, "train": {"epochs": 1}})
    run_search(cfg, space, raw, **QUIET)
    changed, space2, raw2 = tiny_cfg({"n_trials": 1, "train": {"epochs": 2}})
    summary = run_search(changed, space2, raw2, new_study=True, **QUIET)
    assert summary.study_name == "tiny-ner-2" and summary.ran == 1
    assert load_study("tiny-ner", cfg.storage).user_attrs["config"]["train"]["epochs"] == 1
    assert load_study("tiny-ner-2", cfg.storage).user_attrs["config"]["train"]["epochs"] == 2


def test_rerun_with_another_config_is_refused_and_stores_nothing(tiny_cfg):
    cfg, space, raw = tiny_cfg({"n_trials": 1})
    run_search(cfg, space, raw, **QUIET)
    changed, space2, raw2 = tiny_cfg({"n_trials": 2, "train": {"epochs": 3}})
    with pytest.raises(StorageError, match=r"train\.epochs: 2 -> 3"):
        run_search(changed, space2, raw2, **QUIET)
    other_space = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}}
    changed, space3, raw3 = tiny_cfg({"n_trials": 2}, space=other_space)
    with pytest.raises(StorageError, match="search_space"):
        run_search(changed, space3, raw3, **QUIET)
    assert len(load_study(cfg.study_name, cfg.storage).trials) == 1
    # A searched hyperparameter's fixed value is not part of what a stored study searches: every trial draws it
    # (a default that changed after the study was stored, or a value the rerun states, continues the study).
    searched, space4, raw4 = tiny_cfg({"n_trials": 2, "train": {"learning_rate": 3e-4, "batch_size": 16}})
    assert run_search(searched, space4, raw4, **QUIET).ran == 1


def test_a_study_stored_before_a_setting_existed_keeps_what_its_version_did(tiny_cfg):
    from llmflow_hpo.study.provenance import stored_config

    cfg, space, raw = tiny_cfg({"n_trials": 1})
    run_search(cfg, space, raw, **QUIET)
    study = load_study(cfg.study_name, cfg.storage)
    old = study.user_attrs["config"]
    for key in ("group_by_length", "precision", "fused_optimizer"):  # as a version before these settings stored it
        del old["train"][key]
    for section, key in (("sampler", "defaults_first"), ("sampler", "startup"), ("pruner", "patience")):
        del old[section][key]
    study.set_user_attr("config", old)
    stored, _, _ = stored_config(study)  # what retrain-best and workers read
    assert (stored.train.group_by_length, stored.train.precision, stored.train.fused_optimizer) == (
        False,
        "fp32",
        False,
    )
    assert (stored.sampler.defaults_first, stored.sampler.startup, stored.pruner.patience) == (False, "random", None)
    # Today's defaults would search otherwise: the rerun says which settings to restore (not defaults_first,
    # which acts only on an empty study).
    with pytest.raises(
        StorageError,
        match=r"pruner\.patience: None -> 1, sampler\.startup: 'random' -> 'design', "
        r"train\.fused_optimizer: False -> True, train\.group_by_length: False -> True, "
        r"train\.precision: 'fp32' -> 'auto'\)",
    ):
        run_search(*tiny_cfg({"n_trials": 2}), **QUIET)
    old_train = {"group_by_length": False, "precision": "fp32", "fused_optimizer": False}
    before = {"sampler": {"name": "random", "startup": "random"}, "pruner": {"name": "none", "patience": None}}
    again, space2, raw2 = tiny_cfg({"n_trials": 2, "train": old_train, **before})
    assert run_search(again, space2, raw2, **QUIET).counts["complete"] == 2


def test_text_classification_study_optimises_macro_f1(tiny_cfg, text_data):
    space = {
        "learning_rate": {"type": "float", "low": 1e-3, "high": 5e-3, "log": True},
        "class_weighting": {"type": "categorical", "choices": ["none", "balanced"]},
        "loss": {"type": "categorical", "choices": ["cross_entropy", "focal"]},
    }
    changes = text_data(60, every=3, dev_split=0.2, test_split=0.2)
    cfg, dist, raw = tiny_cfg(
        {**changes, "n_trials": 2, "objective": {"metric": "macro_f1"}},
        space=space,
    )
    summary = run_search(cfg, dist, raw, **QUIET)
    assert summary.counts["complete"] == 2
    study = load_study(cfg.study_name, cfg.storage)
    assert "splits: train 28, dev 10, test 10" in study.user_attrs["data_report"]  # 48 read (limit_train)
    for t in study.trials:
        assert t.value == t.user_attrs["dev_macro_f1"]
        assert {"dev_accuracy", "dev_weighted_f1", "dev_loss"} <= set(t.user_attrs)
