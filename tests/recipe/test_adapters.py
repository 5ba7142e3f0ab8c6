"""LoRA adapters through PEFT: which modules train, what the settings reach, what a checkpoint keeps, exact
resume, and the merged model."""

from __future__ import annotations

import math

import pytest
import torch

from llmflow_hpo.config.hyperparameters import TrainConfig
from llmflow_hpo.config.study import load_study_config
from llmflow_hpo.data.features import prepare_features
from llmflow_hpo.recipe.adapters import kept_weights, load_kept_weights, trainable_count, with_adapter
from llmflow_hpo.recipe.checkpoints import BEST, RESUME, TrialCheckpoint
from llmflow_hpo.recipe.models import build_model
from llmflow_hpo.recipe.train import train_and_evaluate

QUIET = {"log": lambda _: None}


def _llama(lm_study):
    cfg = load_study_config(lm_study())
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, task=cfg.task, labels=[], hidden_dropout=None, attention_dropout=None)


def _trained(model) -> set[str]:
    """The kinds of module that train: the last part of each trainable parameter's module path."""
    return {name.split(".lora_")[0].rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("targets", "trained"),
    [
        ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
        ("attention-mlp", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("q_proj,v_proj", {"q_proj", "v_proj"}),
    ],
)
def test_lora_targets_decide_which_modules_of_a_causal_lm_train(lm_study, targets, trained) -> None:
    _, model = _llama(lm_study)
    full = trainable_count(model)
    adapted = with_adapter(model, TrainConfig(adapter="lora", lora_targets=targets), "causal-lm")
    assert _trained(adapted) == trained  # the embeddings (tied to lm_head) and the norms stay frozen
    assert 0 < trainable_count(adapted) < full
    assert all(".lora_" in name for name, p in adapted.named_parameters() if p.requires_grad)


def test_embeddings_train_when_asked_and_stay_tied_to_the_output_layer(lm_study) -> None:
    _, model = _llama(lm_study)
    adapted = with_adapter(model, TrainConfig(adapter="lora", lora_train_embeddings=True), "causal-lm")
    trained = [n for n, p in adapted.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert trained and all("embed_tokens.modules_to_save" in n for n in trained)
    base = adapted.get_base_model()
    assert base.lm_head.weight is base.get_input_embeddings().weight  # one weight, stepped once


def test_a_classifier_head_trains_fully_beside_the_adapter(tiny_cfg) -> None:
    cfg, _, _ = tiny_cfg()
    for task, labels in (("text-classification", ["a", "b"]), ("token-classification", ["O", "B-PER", "I-PER"])):
        torch.manual_seed(0)
        model = build_model(cfg.model, task=task, labels=labels, hidden_dropout=None, attention_dropout=None)
        adapted = with_adapter(model, TrainConfig(adapter="lora", lora_targets="attention"), task)
        trained = {n for n, p in adapted.named_parameters() if p.requires_grad}
        head = {n for n in trained if "classifier" in n}
        assert head and all("modules_to_save" in n for n in head)  # the head's own trained copy, every weight
        assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained - head} == {"query", "key", "value", "dense"}
        assert not any("word_embeddings" in n or "intermediate" in n for n in trained)


def test_rank_alpha_rslora_and_dora_reach_the_adapter(lm_study) -> None:
    def layer(**settings):
        _, model = _llama(lm_study)
        adapted = with_adapter(model, TrainConfig(adapter="lora", lora_targets="q_proj", **settings), "causal-lm")
        return adapted.base_model.model.model.layers[0].self_attn.q_proj

    q = layer(lora_r=4)
    assert q.lora_A["default"].weight.shape[0] == 4 and q.scaling["default"] == 2.0  # alpha = 2 x r by default
    assert layer(lora_r=4, lora_alpha_ratio=0.5).scaling["default"] == 0.5
    assert layer(lora_r=4, lora_alpha=16.0).scaling["default"] == 4.0
    assert layer(lora_r=4, lora_alpha=16.0, lora_rslora=True).scaling["default"] == 16.0 / math.sqrt(4)
    assert not q.lora_magnitude_vector and layer(lora_dora=True).lora_magnitude_vector  # DoRA's magnitudes


def test_an_adapter_checkpoint_holds_the_adapter_only_and_resumes_exactly(lm_study, tmp_path) -> None:
    cfg = load_study_config(lm_study({"train": {"epochs": 2, "evals_per_epoch": 2}, "generation": {"examples": 2}}))
    features = prepare_features(cfg, **QUIET)
    params = {"adapter": "lora", "lora_r": 4, "lora_dropout": 0.1, "learning_rate": 5e-3}
    whole = train_and_evaluate(cfg, params, features, seed=3)

    class Crash(Exception):
        pass

    seen = []

    def crash_at_second(evaluation):
        seen.append(evaluation.step)
        if len(seen) == 2:
            raise Crash

    checkpoint = TrialCheckpoint(tmp_path / "trial", params, every_evals=1, max_overhead=1e9)
    with pytest.raises(Crash):
        train_and_evaluate(cfg, params, features, seed=3, on_eval=crash_at_second, checkpoint=checkpoint)
    saved = torch.load(tmp_path / "trial" / RESUME, weights_only=False)["model"]
    assert saved and all("lora_" in name for name in saved)  # the adapter only: the frozen base is rebuilt
    full_bytes = 4 * sum(p.numel() for p in _llama(lm_study)[1].parameters())
    assert (tmp_path / "trial" / BEST).stat().st_size < full_bytes / 3  # the best weights: the adapter's too
    resumed = train_and_evaluate(
        cfg, params, features, seed=3, checkpoint=TrialCheckpoint(tmp_path / "trial", params, every_evals=1)
    )
    ours = [(e.step, e.metrics["loss"], e.train_loss, e.weights_sha256) for e in resumed.history]
    theirs = [(e.step, e.metrics["loss"], e.train_loss, e.weights_sha256) for e in whole.history]
    assert ours == theirs


def test_kept_weights_load_back_into_a_fresh_adapter_model(lm_study) -> None:
    _, model = _llama(lm_study)
    hp = TrainConfig(adapter="lora", lora_r=2)
    adapted = with_adapter(model, hp, "causal-lm")
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    state = {k: v.clone() for k, v in kept_weights(adapted).items()}
    _, fresh = _llama(lm_study)
    fresh = with_adapter(fresh, hp, "causal-lm")
    load_kept_weights(fresh, state)
    ids = torch.tensor([[5, 9, 14, 3]])
    assert torch.equal(fresh.eval()(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits)


def test_the_merged_model_gives_the_adapters_logits(lm_study) -> None:
    _, model = _llama(lm_study)
    adapted = with_adapter(model, TrainConfig(adapter="lora", lora_r=4), "causal-lm").eval()
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero: make the adapter change the output
        ids = torch.tensor([[5, 9, 14, 3, 20, 7]])
        unmerged = adapted(input_ids=ids).logits
        merged = adapted.merge_and_unload()(input_ids=ids).logits
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert (
        unmerged
        - build_model(
            load_study_config(lm_study()).model,
            task="causal-lm",
            labels=[],
            hidden_dropout=None,
            attention_dropout=None,
        )(input_ids=ids).logits
    ).abs().max() > 0


def test_gradient_checkpointing_trains_the_same_weights_with_and_without_an_adapter(lm_study) -> None:
    cfg = load_study_config(lm_study({"train": {"epochs": 1, "evals_per_epoch": 2}, "generation": {"examples": 0}}))
    features = prepare_features(cfg, **QUIET)
    for params in ({"lora_dropout": 0.1}, {"adapter": "lora", "lora_dropout": 0.1}):
        plain = train_and_evaluate(cfg, params, features, seed=2)
        saved = train_and_evaluate(cfg, {**params, "gradient_checkpointing": True}, features, seed=2)
        # recomputed activations (torch's checkpoint restores the dropout RNG): the same losses, to rounding
        assert [round(e.metrics["loss"], 5) for e in saved.history] == [
            round(e.metrics["loss"], 5) for e in plain.history
        ]
