"""Checkpoints in the training loop: a run killed after a checkpoint and resumed equals an uninterrupted run."""

from __future__ import annotations

import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

from llmflow_hpo.data.features import prepare_features
from llmflow_hpo.recipe.batches import EpochSampler
from llmflow_hpo.recipe.checkpoints import BEST, RESUME, CheckpointStore, TrialCheckpoint
from llmflow_hpo.recipe.train import train_and_evaluate

QUIET = {"log": lambda _: None}
PARAMS = {"learning_rate": 2e-3, "batch_size": 8}


class Crash(Exception):
    """Stands in for SIGKILL: the run stops at an evaluation, after its previous checkpoint was written."""


def _orders(loader, epochs=3):
    return [[int(i) for batch in loader for i in batch] for _ in range(epochs)]


def test_epoch_sampler_draws_the_orders_of_a_shuffling_loader():
    data = torch.arange(10)
    theirs = torch.utils.data.DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    ours = torch.utils.data.DataLoader(data, batch_size=3, sampler=EpochSampler(10, g), generator=g)
    assert _orders(ours) == _orders(theirs)


def test_epoch_sampler_resumes_mid_epoch_with_the_same_order():
    data = torch.arange(10)
    g = torch.Generator().manual_seed(5)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=EpochSampler(10, g), generator=g)
    first = _orders(loader, 1)[0]
    state = g.get_state()  # where the second epoch starts
    rest = _orders(loader, 2)
    g2 = torch.Generator()
    sampler = EpochSampler(10, g2)
    resumed = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler, generator=g2)
    g2.set_state(state)
    sampler.skip = 4
    assert _orders(resumed, 2) == [rest[0][4:], rest[1]]
    assert first != rest[0]


# Checkpoint at every due evaluation whatever the write costs: these tests count the writes, and on a
# loaded machine a write can take longer than the tiny model's training since the last one (CI saw 3 of 4).
ALWAYS = 1e9


def _history(result):
    return [(e.step, e.optimizer_step, e.metrics["f1"], e.metrics["loss"], e.train_loss) for e in result.history]


@pytest.fixture
def setup(tiny_cfg):
    cfg, _, _ = tiny_cfg({"train": {"epochs": 3, "evals_per_epoch": 2, "hidden_dropout": 0.2}})
    return cfg, prepare_features(cfg, **QUIET)


def test_a_resumed_run_continues_exactly_where_the_checkpoint_was(setup, tmp_path):
    cfg, features = setup
    whole = train_and_evaluate(cfg, PARAMS, features, seed=cfg.seed)

    checkpoint = TrialCheckpoint(tmp_path / "trial-0", PARAMS, every_evals=1, max_overhead=ALWAYS)
    seen = []

    def crash_at_fourth(evaluation):
        seen.append(evaluation.step)
        if len(seen) == 4:
            raise Crash

    with pytest.raises(Crash):
        train_and_evaluate(cfg, PARAMS, features, seed=cfg.seed, on_eval=crash_at_fourth, checkpoint=checkpoint)
    # The checkpoint after an evaluation is written before the evaluation is reported: four of them.
    assert checkpoint.written == 4 and (tmp_path / "trial-0" / RESUME).is_file()
    assert (tmp_path / "trial-0" / BEST).is_file()

    restored, reported = [], []
    resumed = train_and_evaluate(
        cfg,
        PARAMS,
        features,
        seed=cfg.seed,
        on_eval=lambda e: reported.append(e.step),
        checkpoint=TrialCheckpoint(tmp_path / "trial-0", PARAMS, every_evals=1, max_overhead=ALWAYS),
        on_resume=lambda history: restored.extend(e.step for e in history),
    )
    # It took back the four evaluations of the checkpoint and trained only from the fourth on ...
    assert restored == seen
    assert reported == [e.step for e in whole.history[4:]]
    # ... and reached exactly what the uninterrupted run did: same batches, same dropout, same optimizer state.
    assert _history(resumed) == _history(whole)
    assert resumed.best.step == whole.best.step


def test_a_checkpoint_of_other_parameters_is_not_used(setup, tmp_path):
    cfg, features = setup
    checkpoint = TrialCheckpoint(tmp_path / "trial-0", PARAMS, every_evals=1)
    with pytest.raises(Crash):
        train_and_evaluate(
            cfg, PARAMS, features, seed=cfg.seed, on_eval=lambda e: (_ for _ in ()).throw(Crash), checkpoint=checkpoint
        )
    other = {**PARAMS, "learning_rate": 1e-3}
    assert TrialCheckpoint(tmp_path / "trial-0", other, every_evals=1).load() is None


def test_every_evals_spaces_the_checkpoints(setup, tmp_path):
    cfg, features = setup
    checkpoint = TrialCheckpoint(tmp_path / "t", PARAMS, every_evals=2, max_overhead=ALWAYS)
    result = train_and_evaluate(cfg, PARAMS, features, seed=cfg.seed, checkpoint=checkpoint)
    # 6 evaluations; the last one ends the run, so evaluations 2 and 4 are checkpointed.
    assert len(result.history) == 6 and checkpoint.written == 2
    assert result.checkpoints_written == 2 and result.checkpoint_seconds > 0


def test_a_checkpoint_is_due_only_when_its_write_cost_fits_the_overhead(tmp_path):
    cheap = TrialCheckpoint(tmp_path / "a", PARAMS, every_evals=2, max_overhead=1.0)
    assert [cheap.due() for _ in range(4)] == [False, True, False, True]  # every second evaluation
    cheap.save({"progress": {"history": []}})
    time.sleep(0.05)
    assert [cheap.due(), cheap.due()] == [False, True]  # the write took far less than 50 ms
    strict = TrialCheckpoint(tmp_path / "b", PARAMS, max_overhead=1e-6)
    assert strict.due()  # the first one is always written: it measures the cost
    strict.save({"progress": {"history": []}})
    assert not strict.due()  # the next only after a million times the write's duration


def test_the_write_cost_carries_over_to_the_next_trial_of_the_process(tmp_path):
    store = CheckpointStore(tmp_path, max_overhead=1e-6)
    first = store.trial(0, PARAMS)
    assert first.due()  # nothing known yet: written, and timed
    first.save({"progress": {"history": []}})
    assert store.write_s is not None
    assert not store.trial(1, PARAMS).due()  # a short trial with a known cost writes none


def _trial(number, state, value=None, **attrs):
    return optuna.trial.create_trial(state=state, value=value, user_attrs=attrs)


def test_cleanup_keeps_the_best_k_and_what_a_retry_still_needs(tmp_path):
    store = CheckpointStore(tmp_path, every_evals=1, keep_best=2)
    trials = [
        _trial(0, TrialState.COMPLETE, 0.5),
        _trial(1, TrialState.COMPLETE, 0.9),
        _trial(2, TrialState.PRUNED, 0.1),
        _trial(3, TrialState.COMPLETE, 0.7),
        _trial(4, TrialState.FAIL),  # killed; its retry (trial 6) is queued
        _trial(5, TrialState.FAIL, failed_for_good=True),
        _trial(6, TrialState.WAITING, checkpoint_trial=4),
        _trial(7, TrialState.RUNNING),
    ]
    for number, trial in enumerate(trials):
        trial.number = number
        if trial.state == TrialState.WAITING:
            continue  # a queued trial has no folder of its own yet
        folder = store.folder(number)
        folder.mkdir()
        (folder / RESUME).write_bytes(b"x" * 100)
        (folder / BEST).write_bytes(b"y" * 10)
    store.cleanup(trials, "maximize")
    kept = {p.name: sorted(f.name for f in p.iterdir()) for p in tmp_path.iterdir()}
    assert kept == {
        "trial-1": [BEST],  # the two best complete trials keep their best weights only
        "trial-3": [BEST],
        "trial-4": [BEST, RESUME],  # its retry will take it over
        "trial-7": [BEST, RESUME],  # still running
    }
    assert store.disk_usage() == 2 * 10 + 2 * 110


def test_take_over_moves_the_attempts_folder_to_the_retry(tmp_path):
    store = CheckpointStore(tmp_path, every_evals=1, keep_best=1)
    store.folder(4).mkdir()
    (store.folder(4) / RESUME).write_bytes(b"state")
    assert store.take_over(4, 9)
    assert not store.folder(4).exists() and (store.folder(9) / RESUME).read_bytes() == b"state"
    assert not store.take_over(5, 10)  # nothing to take over: the retry starts over
