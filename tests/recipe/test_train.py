"""The training recipe on tiny random models: schedule, losses, evaluation points, early stopping, best-not-last."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llmflow_hpo.config.study import TrainConfig
from llmflow_hpo.data.features import prepare_features
from llmflow_hpo.recipe.loss import loss_fn
from llmflow_hpo.recipe.optim import build_scheduler, warmup_steps
from llmflow_hpo.recipe.runtime import resolve_runtime
from llmflow_hpo.recipe.train import retrain, train_and_evaluate
from llmflow_hpo.tasks import IGNORE_INDEX


def _lrs(hp: TrainConfig, total: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=hp.learning_rate)
    sched = build_scheduler(opt, hp, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_ratio_becomes_steps_of_this_run():
    assert warmup_steps(0.1, 100) == 10
    assert warmup_steps(0.0, 100) == 0
    assert warmup_steps(0.25, 10) == 3  # rounded up: a non-zero ratio always warms up
    hp = TrainConfig(learning_rate=1.0, warmup_ratio=0.2, scheduler="linear")
    lrs = _lrs(hp, 50)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5)  # half-way through the 10 warmup steps
    assert lrs[10] == pytest.approx(1.0)  # peak right after warmup
    assert lrs[30] == pytest.approx(0.5)  # then linear decay to 0 at step 50
    assert max(lrs) == pytest.approx(1.0)


def test_no_warmup_starts_at_peak_and_cosine_decays():
    lrs = _lrs(TrainConfig(learning_rate=2.0, warmup_ratio=0.0, scheduler="cosine"), 20)
    assert lrs[0] == pytest.approx(2.0)
    assert lrs[10] == pytest.approx(1.0)


def test_cross_entropy_skips_ignored_positions_and_smooths():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[0, 1, IGNORE_INDEX]])
    hp = TrainConfig()
    expected = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, :2])
    assert loss_fn(logits, labels, hp, None) == pytest.approx(float(expected))
    smoothed = loss_fn(logits, labels, dataclasses.replace(hp, label_smoothing=0.1), None)
    assert float(smoothed) > float(expected)


def test_focal_loss_with_gamma_zero_is_cross_entropy_and_downweights_easy_examples():
    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0]])
    labels = torch.tensor([0, 0])
    ce = loss_fn(logits, labels, TrainConfig(), None)
    assert loss_fn(logits, labels, TrainConfig(loss="focal", focal_gamma=0.0), None) == pytest.approx(float(ce))
    per_example_ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    p = torch.softmax(logits, -1)[:, 0]
    expected = ((1 - p) ** 2 * per_example_ce).mean()
    assert loss_fn(logits, labels, TrainConfig(loss="focal", focal_gamma=2.0), None) == pytest.approx(float(expected))


def test_class_weights_change_the_loss():
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    weights = torch.tensor([0.75, 1.5])  # balanced weights of a 2:1 split: 3 / (2 * count)
    ce = torch.nn.functional.cross_entropy(logits, labels, weight=weights)
    assert loss_fn(logits, labels, TrainConfig(), weights) == pytest.approx(float(ce))
    assert float(ce) != pytest.approx(float(loss_fn(logits, labels, TrainConfig(), None)))


def test_evaluation_points_are_in_examples_seen_whatever_the_batch_size(tiny_cfg):
    cfg, _, _ = tiny_cfg()
    features = prepare_features(cfg, log=lambda _: None)
    n = len(features.splits["train"])
    steps = {}
    for batch_size in (8, 16):
        result = train_and_evaluate(cfg, {"batch_size": batch_size}, features, seed=1)
        steps[batch_size] = [e.step for e in result.history]
        assert all(e.examples_seen >= e.step and e.examples_seen - e.step < batch_size for e in result.history)
    assert steps[8] == steps[16] == [round(n * k / 2) for k in range(1, 5)]


def test_early_stopping_ends_the_run_after_patience(tiny_cfg, monkeypatch):
    cfg, _, _ = tiny_cfg({"train": {"early_stopping_patience": 2, "epochs": 4}})
    features = prepare_features(cfg, log=lambda _: None)
    scores = iter([0.3, 0.5, 0.5, 0.4, 0.9, 0.9, 0.9, 0.9])
    monkeypatch.setattr("llmflow_hpo.recipe.train.evaluate", lambda *a, **k: ({"f1": next(scores), "loss": 1.0}, []))
    result = train_and_evaluate(cfg, {}, features, seed=1)
    assert result.stopped_early
    assert [e.metrics["f1"] for e in result.history] == [0.3, 0.5, 0.5, 0.4]  # 0.9 never reached
    assert result.best is result.history[1]


def test_min_delta_decides_patience_only_and_the_best_evaluation_is_the_best(tiny_cfg, monkeypatch, tmp_path):
    from llmflow_hpo.recipe.checkpoints import CheckpointStore

    cfg, _, _ = tiny_cfg({"train": {"early_stopping_patience": 1, "early_stopping_min_delta": 0.05}})
    features = prepare_features(cfg, log=lambda _: None)
    scores = [0.5, 0.52, 0.9, 0.9]
    evaluated: list[float] = []

    def evaluate(*args, **kwargs):
        evaluated.append(scores[len(evaluated)])
        return {"f1": evaluated[-1], "loss": 1.0}, []

    monkeypatch.setattr("llmflow_hpo.recipe.train.evaluate", evaluate)
    remembered: list[int] = []
    checkpoint = CheckpointStore(tmp_path / "ckpt").trial(0, {})
    monkeypatch.setattr(checkpoint, "remember_best", lambda model: remembered.append(len(evaluated)))
    result = train_and_evaluate(cfg, {}, features, seed=1, checkpoint=checkpoint)
    # 0.52 is not 0.05 better than 0.5, so patience (1) stops the trial; but 0.52 is its best evaluation.
    assert [e.metrics["f1"] for e in result.history] == [0.5, 0.52]
    assert result.best is result.history[1] and result.best.metrics["f1"] == 0.52
    assert remembered == [1, 2]  # the kept best weights are those of the second evaluation


def test_best_evaluation_not_last_is_the_result(tiny_cfg, monkeypatch):
    cfg, _, _ = tiny_cfg()
    features = prepare_features(cfg, log=lambda _: None)
    scores = iter([0.4, 0.8, 0.6, 0.7])
    monkeypatch.setattr("llmflow_hpo.recipe.train.evaluate", lambda *a, **k: ({"f1": next(scores), "loss": 1.0}, []))
    result = train_and_evaluate(cfg, {}, features, seed=1)
    assert result.best.metrics["f1"] == 0.8
    assert result.best.step == result.history[1].step
    assert result.history[-1].metrics["f1"] == 0.7


def test_loss_objective_minimizes(tiny_cfg, monkeypatch):
    cfg, _, _ = tiny_cfg({"objective": {"metric": "loss"}})
    assert cfg.direction == "minimize"
    features = prepare_features(cfg, log=lambda _: None)
    losses = iter([0.9, 0.5, 0.7, 0.6])
    monkeypatch.setattr("llmflow_hpo.recipe.train.evaluate", lambda *a, **k: ({"f1": 0.0, "loss": next(losses)}, []))
    assert train_and_evaluate(cfg, {}, features, seed=1).best.metrics["loss"] == 0.5


def test_same_seed_same_result_and_evaluation_does_not_disturb_training(tiny_cfg):
    cfg, _, _ = tiny_cfg()
    features = prepare_features(cfg, log=lambda _: None)
    a = train_and_evaluate(cfg, {}, features, seed=3)
    b = train_and_evaluate(cfg, {}, features, seed=3)
    assert [e.metrics for e in a.history] == [e.metrics for e in b.history]
    # Stopping at the third evaluation point without evaluating on the way gives the same weights.
    third = a.history[2]
    c = retrain(cfg, {}, features, seed=3, stop_at_examples=third.step)
    assert c.final.metrics == third.metrics
    assert c.final.optimizer_step == third.optimizer_step


def test_diverging_run_is_a_trial_failure(tiny_cfg):
    from llmflow_hpo.errors import TrialFailure

    cfg, _, _ = tiny_cfg({"train": {"max_grad_norm": None}})
    features = prepare_features(cfg, log=lambda _: None)
    with pytest.raises(TrialFailure, match="diverged: non-finite training loss"):
        train_and_evaluate(cfg, {"learning_rate": 1e30, "optimizer": "sgd"}, features, seed=1)


@pytest.mark.parametrize(
    "params",
    [
        {"optimizer": "sgd", "momentum": 0.8, "learning_rate": 0.05},
        {"optimizer": "adafactor"},
        {"loss": "focal", "focal_gamma": 2.0, "class_weighting": "balanced", "label_smoothing": 0.1},
        {
            "hidden_dropout": 0.0,
            "attention_dropout": 0.2,
            "scheduler": "cosine",
            "warmup_ratio": 0.1,
            "weight_decay": 0.05,
        },
        {"max_grad_norm": 0.0},  # a searched 0 turns clipping off, as a fixed 0 does (it zeroed every gradient)
        {"max_grad_norm": 0.5, "weight_decay": 0.0},
    ],
)
def test_every_knob_trains(tiny_cfg, params):
    from llmflow_hpo.recipe.models import build_model

    cfg, _, _ = tiny_cfg({"train": {"epochs": 1}})
    features = prepare_features(cfg, log=lambda _: None)
    torch.manual_seed(1)  # train_and_evaluate seeds the same way before it builds the model
    initial = build_model(cfg.model, task=cfg.task, labels=features.labels, hidden_dropout=None, attention_dropout=None)
    result = train_and_evaluate(cfg, params, features, seed=1, keep_model=True)
    assert len(result.history) == 2
    assert all(math.isfinite(e.train_loss) for e in result.history)
    assert result.n_params > 0 and result.examples_per_second > 0
    # Training moved the weights: every parameter the loss reaches (the pooler is unused in token classification).
    before = dict(initial.named_parameters())
    unchanged = [
        name
        for name, p in result.model.named_parameters()
        if "pooler" not in name and torch.equal(p.detach(), before[name].detach())
    ]
    assert not unchanged


def test_a_batch_larger_than_the_evaluation_interval_is_reported_at_the_last_point_it_crossed(tiny_cfg):
    cfg, _, _ = tiny_cfg({"train": {"epochs": 1, "evals_per_epoch": 4, "batch_size": 16}})
    features = prepare_features(cfg, log=lambda _: None)
    result = train_and_evaluate(cfg, {}, features, seed=1)  # 48 examples: points 12, 24, 36, 48
    assert [(e.step, e.examples_seen) for e in result.history] == [(12, 16), (24, 32), (48, 48)]


def test_focal_loss_of_a_batch_without_labels_is_zero_not_nan():
    logits = torch.zeros(1, 3, 2, requires_grad=True)
    labels = torch.full((1, 3), IGNORE_INDEX)
    loss = loss_fn(logits, labels, TrainConfig(loss="focal"), None)
    assert float(loss.detach()) == 0.0


def test_a_cloned_state_takes_the_new_learning_rate_weight_decay_and_momentum() -> None:
    """PBT: a trial continues another trial's optimizer and schedule with mutated hyperparameters."""
    from llmflow_hpo.recipe.optim import adopt_hyperparameters, build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    old = TrainConfig(learning_rate=1e-3, weight_decay=0.01, warmup_ratio=0.5, optimizer="sgd", momentum=0.9)
    optimizer = build_optimizer(model, old, resolve_runtime(old))
    scheduler = build_scheduler(optimizer, old, total_steps=10)
    for _ in range(3):  # inside the warmup: the factor is 3/5
        optimizer.step()
        scheduler.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

    new = dataclasses.replace(old, learning_rate=2e-3, weight_decay=0.05, momentum=0.8)
    optimizer = build_optimizer(model, new, resolve_runtime(new))
    scheduler = build_scheduler(optimizer, new, total_steps=10)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 5)  # the loaded state says the old rate
    adopt_hyperparameters(optimizer, scheduler, new)
    decayed, no_decay = optimizer.param_groups
    assert decayed["lr"] == no_decay["lr"] == pytest.approx(2e-3 * 3 / 5)
    assert decayed["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decayed["momentum"] == no_decay["momentum"] == 0.8
    assert scheduler.last_epoch == 3
    optimizer.step()
    scheduler.step()  # the schedule goes on from the new peak
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * 4 / 5)


# ----------------------------------------------------------------------------------------------------
# Class weights with label smoothing and focal loss (issue 13, item 1): test the optimum, not finiteness.

# Balanced weights as on an NER training split: O is common, the entity tags rare.
NER_WEIGHTS = torch.tensor([0.15, 9.0, 25.0, 40.0, 60.0, 12.0, 30.0])


def _optimal_probabilities(hp: TrainConfig, target: int, weights: torch.Tensor | None) -> torch.Tensor:
    """The class probabilities that minimise the loss of one position whose gold class is ``target``."""
    logits = torch.zeros(len(NER_WEIGHTS), requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], lr=0.5, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(logits[None, None, :], torch.tensor([[target]]), hp, weights)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    return torch.softmax(logits.detach(), dim=-1)


@pytest.mark.parametrize("loss", ["cross_entropy", "focal"])
@pytest.mark.parametrize("smoothing", [0.1, 0.2])
def test_class_weights_leave_the_smoothed_optimum_of_an_o_word_where_it_is(loss, smoothing):
    k = len(NER_WEIGHTS)
    hp = TrainConfig(loss=loss, focal_gamma=0.0, label_smoothing=smoothing)
    p = _optimal_probabilities(hp, 0, NER_WEIGHTS)
    # The smoothed target: 1 - e + e/K on the gold class, e/K on every other, whatever the weights.
    assert float(p[0]) == pytest.approx(1 - smoothing + smoothing / k, abs=1e-3)
    assert torch.allclose(p[1:], torch.full((k - 1,), smoothing / k), atol=1e-3)
    assert int(p.argmax()) == 0
    assert torch.allclose(p, _optimal_probabilities(hp, 0, None), atol=1e-3)  # as without weights


def test_weighted_focal_loss_is_normalised_as_weighted_cross_entropy():
    logits = torch.randn(2, 5, len(NER_WEIGHTS), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 0, 3, IGNORE_INDEX, 1], [0, 4, 0, 0, IGNORE_INDEX]])
    focal = loss_fn(logits, labels, TrainConfig(loss="focal", focal_gamma=0.0), NER_WEIGHTS)
    weighted = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), weight=NER_WEIGHTS, ignore_index=IGNORE_INDEX
    )
    assert float(focal) == pytest.approx(float(weighted), rel=1e-6)
    ours = loss_fn(logits, labels, TrainConfig(), NER_WEIGHTS)  # weighted cross-entropy, unsmoothed
    assert float(ours) == pytest.approx(float(weighted), rel=1e-6)


def test_a_tied_weight_is_stepped_once_and_rmsnorm_is_not_decayed(lm_study):
    # Before: a causal LM's embedding (tied to lm_head) sat twice in the decayed group, so AdamW stepped it twice.
    from llmflow_hpo.config.study import load_study_config
    from llmflow_hpo.recipe.models import build_model
    from llmflow_hpo.recipe.optim import build_optimizer
    from llmflow_hpo.recipe.runtime import resolve_runtime

    cfg = load_study_config(lm_study({"train": {"weight_decay": 0.1}}))
    model = build_model(cfg.model, task=cfg.task, labels=[], hidden_dropout=None, attention_dropout=None)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    decay, no_decay = (
        group["params"] for group in build_optimizer(model, cfg.train, resolve_runtime(cfg.train)).param_groups
    )
    ids = [id(p) for p in decay + no_decay]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    norms = {id(m.weight) for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"}
    assert norms and norms <= {id(p) for p in no_decay}
