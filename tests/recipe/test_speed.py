"""Fast trials: length-grouped batches, evaluation in length order, the GPU settings and where a trial's time goes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader

from llmflow_hpo.config.study import TrainConfig
from llmflow_hpo.data.features import prepare_features
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.recipe.batches import EpochSampler, ModelInputs, by_length
from llmflow_hpo.recipe.evaluation import evaluate
from llmflow_hpo.recipe.models import build_model, load_tokenizer
from llmflow_hpo.recipe.runtime import Runtime, resolve_runtime
from llmflow_hpo.recipe.train import train_and_evaluate
from llmflow_hpo.tasks import get_task


def _padding(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Padded positions per real token when the examples are batched in ``order`` and padded per batch."""
    pad = real = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        pad += max(batch) * len(batch) - sum(batch)
        real += sum(batch)
    return pad / real


def test_length_grouped_epochs_are_permutations_with_little_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (400,), generator=gen).tolist()
    grouped = EpochSampler(400, torch.Generator().manual_seed(1), lengths, batch_size=8)
    uniform = EpochSampler(400, torch.Generator().manual_seed(1))
    epochs = [list(grouped) for _ in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(400))  # every example once per epoch
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert _padding(lengths, epochs[0], 8) < _padding(lengths, list(uniform), 8) / 4
    # The same generator state gives the same order: what a resumed run replays.
    again = EpochSampler(400, torch.Generator().manual_seed(1), lengths, batch_size=8)
    assert list(again) == epochs[0]


def test_uniform_sampling_keeps_the_order_of_a_shuffling_loader() -> None:
    # As the training loop builds it: the loader and the sampler share the generator.
    gen = torch.Generator().manual_seed(3)
    ours = DataLoader(range(50), batch_size=1, sampler=EpochSampler(50, gen), generator=gen)
    theirs = DataLoader(range(50), batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(3))
    assert [[int(x) for x in ours] for _ in range(2)] == [[int(x) for x in theirs] for _ in range(2)]


def test_evaluation_in_length_order_scores_exactly_as_in_split_order(tiny_cfg) -> None:
    cfg, _, _ = tiny_cfg()
    features = prepare_features(cfg, log=lambda _: None)
    model = build_model(cfg.model, task=cfg.task, labels=features.labels, hidden_dropout=None, attention_dropout=None)
    collate = get_task(cfg.task).collator(load_tokenizer(cfg.model), cfg.data)
    dev = features.splits["dev"]
    runtime = resolve_runtime(cfg.train)
    in_order = DataLoader(ModelInputs(dev), batch_size=7, shuffle=False, collate_fn=collate)
    longest_first = DataLoader(ModelInputs(dev), batch_size=7, sampler=by_length(dev), collate_fn=collate)
    assert longest_first.sampler != list(range(len(dev)))  # a real reordering
    a, _ = evaluate(model, in_order, features, "dev", runtime)
    b, _ = evaluate(model, longest_first, features, "dev", runtime)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_on_cpu_everything_stays_fp32_and_fp16_is_refused() -> None:
    runtime = resolve_runtime(TrainConfig(device="cpu"))
    assert runtime.attrs() == {
        "device": "cpu",
        "precision": "fp32",
        "tf32": False,
        "fused_optimizer": True,  # torch's fused AdamW kernel runs on CPU tensors too
        "pin_memory": False,
    }
    assert not resolve_runtime(TrainConfig(device="cpu", fused_optimizer=False)).fused_optimizer
    assert not resolve_runtime(TrainConfig(device="cpu", optimizer="sgd")).fused_optimizer
    assert resolve_runtime(TrainConfig(device="cpu", precision="bf16")).precision == "bf16"
    with pytest.raises(ConfigError, match=r"train\.precision: fp16 needs a GPU"):
        resolve_runtime(TrainConfig(device="cpu", precision="fp16"))


@pytest.mark.parametrize(
    ("bf16", "capability", "precision", "tf32"), [(True, (9, 0), "bf16", True), (False, (7, 0), "fp16", False)]
)
def test_on_a_gpu_the_fast_settings_are_chosen(monkeypatch, bf16, capability, precision, tf32) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    runtime = resolve_runtime(TrainConfig(), torch.device("cuda"))
    assert (runtime.precision, runtime.tf32, runtime.fused_optimizer, runtime.pin_memory) == (
        precision,
        tf32,
        True,
        True,
    )
    assert resolve_runtime(TrainConfig(precision="fp32"), torch.device("cuda")).precision == "fp32"
    assert not resolve_runtime(TrainConfig(optimizer="sgd"), torch.device("cuda")).fused_optimizer
    assert not resolve_runtime(TrainConfig(fused_optimizer=False), torch.device("cuda")).fused_optimizer


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_is_built_with_the_kernel_the_runtime_names(fused) -> None:
    from llmflow_hpo.recipe.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    hp = TrainConfig(device="cpu", fused_optimizer=fused)
    optimizer = build_optimizer(model, hp, resolve_runtime(hp))
    assert bool(optimizer.defaults["fused"]) is fused
    # Either kernel takes the same step: AdamW's first update moves every weight by about lr.
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 4)).pow(2).sum().backward()
    optimizer.step()
    for old, new in zip(before, model.parameters(), strict=True):
        assert torch.allclose((old - new).abs().max(), torch.tensor(hp.learning_rate), rtol=0.05)


def test_bf16_autocast_trains_on_cpu(tiny_cfg) -> None:
    cfg, _, _ = tiny_cfg({"train": {"precision": "bf16", "epochs": 1}})
    features = prepare_features(cfg, log=lambda _: None)
    result = train_and_evaluate(cfg, {}, features, seed=0)
    assert result.runtime["precision"] == "bf16"
    assert result.best is not None and result.best.train_loss > 0


def test_a_run_accounts_for_its_time(tiny_cfg) -> None:
    cfg, _, _ = tiny_cfg({"train": {"epochs": 2}})
    features = prepare_features(cfg, log=lambda _: None)
    result = train_and_evaluate(cfg, {}, features, seed=0)
    assert result.setup_seconds > 0 and result.train_seconds > 0 and result.eval_seconds > 0
    # Set-up before the loop is not in train_time_s; training and evaluations are, with little else.
    inside = result.train_seconds + result.eval_seconds
    assert inside <= result.train_time_s <= inside * 1.5 + 0.05
    assert result.runtime == {
        "device": "cpu",
        "precision": "fp32",
        "tf32": False,
        "fused_optimizer": True,
        "pin_memory": False,
        "group_by_length": True,
    }


def test_length_grouping_trains_on_the_same_examples(tiny_cfg, monkeypatch) -> None:
    cfg, _, _ = tiny_cfg({"train": {"epochs": 2}})
    features = prepare_features(cfg, log=lambda _: None)
    train = features.splits["train"]
    fetched: list[int] = []  # the training examples each run reads, in the order it reads them
    original = ModelInputs.__getitem__

    def record(self, index: int):
        if self.ds is train:
            fetched.append(index)
        return original(self, index)

    monkeypatch.setattr(ModelInputs, "__getitem__", record)
    grouped = train_and_evaluate(cfg, {}, features, seed=0)
    grouped_order, fetched[:] = list(fetched), []
    uniform = train_and_evaluate(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, group_by_length=False)), {}, features, seed=0
    )
    uniform_order = list(fetched)
    assert grouped.runtime["group_by_length"] and not uniform.runtime["group_by_length"]
    assert [e.examples_seen for e in grouped.history] == [e.examples_seen for e in uniform.history]
    n = len(train)
    for order in (grouped_order, uniform_order):  # every example once per epoch, in both runs
        assert len(order) == 2 * n
        assert sorted(order[:n]) == sorted(order[n:]) == list(range(n))
    assert grouped_order != uniform_order  # in another order: the grouping is real


def test_the_fp16_path_scales_the_loss_and_checkpoints_the_scaler(tiny_cfg, monkeypatch, tmp_path) -> None:
    # fp16 with loss scaling is chosen on GPUs without bf16; torch's CPU autocast and GradScaler run the same code here.
    from llmflow_hpo.recipe import train
    from llmflow_hpo.recipe.checkpoints import CheckpointStore

    monkeypatch.setattr(
        train,
        "resolve_runtime",
        lambda hp, device=None: Runtime(
            torch.device("cpu"), "fp16", tf32=False, fused_optimizer=False, pin_memory=False
        ),
    )
    scaled = []
    real_scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, x: scaled.append(float(x)) or real_scale(self, x))
    cfg, _, _ = tiny_cfg({"train": {"epochs": 2}})
    features = prepare_features(cfg, log=lambda _: None)
    store = CheckpointStore(tmp_path / "ck", max_overhead=1.0)
    checkpoint = store.trial(0, {})
    saved = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda state: saved.append(state) or real_save(state))
    result = train_and_evaluate(cfg, {}, features, seed=0, checkpoint=checkpoint)
    assert result.runtime["precision"] == "fp16"
    assert len(scaled) == result.history[-1].optimizer_step  # every step's loss went through the scaler
    assert saved and all(state["scaler"]["scale"] > 0 for state in saved)
    assert all(e.train_loss > 0 for e in result.history)
