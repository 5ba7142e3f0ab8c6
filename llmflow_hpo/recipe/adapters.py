"""LoRA adapters (PEFT) on a trial's model, and the weights a run keeps of it.

``with_adapter`` wraps the freshly built model in a PEFT LoRA model when ``train.adapter`` is ``lora``: the
adapter goes on the ``train.lora_targets`` layers, the base is frozen, and PEFT's ``task_type`` (the task's
``peft_task_type``) makes the head of a classification task (``classifier``/``score``) train fully
(``modules_to_save``). The embeddings of a causal LM stay frozen unless ``lora_train_embeddings``.

``kept_weights`` is what a checkpoint, the kept best model and the weights' digest hold: the adapter and the
head for a LoRA model (PEFT's ``get_peft_model_state_dict``), everything otherwise. The frozen base is rebuilt
the same way by every run of the trial (pretrained weights, or the seeded random init), so the adapter's
weights are the whole state a resume needs. Written by hand: only the target presets, which PEFT has one of
(``all-linear``).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from llmflow_hpo.config.hyperparameters import TrainConfig
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.tasks import get_task

__all__ = ["adapter_settings", "is_adapter", "kept_weights", "load_kept_weights", "trainable_count", "with_adapter"]

# A module inside a numbered transformer block: encoder.layer.3.attention..., model.layers.3.mlp..., h.3.attn...
_IN_BLOCK = re.compile(r"(^|\.)(layers?|h|blocks?)\.\d+\.")
_ATTENTION = re.compile(r"attn|attention")


def _targets(model: Any, hp: TrainConfig) -> list[str] | str:
    """The modules ``lora_targets`` names on this model (PEFT's target_modules)."""
    import torch

    if hp.lora_targets == "all-linear":
        return "all-linear"
    if hp.lora_targets in ("attention", "attention-mlp"):
        linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
        chosen = [name for name in linear if _IN_BLOCK.search(name)]
        if hp.lora_targets == "attention":
            chosen = [name for name in chosen if _ATTENTION.search(name)]
        if not chosen:
            raise ConfigError(
                f"train.lora_targets: {hp.lora_targets} finds no linear layer in {type(model).__name__}'s blocks; "
                "name the modules instead (e.g. q_proj,v_proj)"
            )
        return chosen
    names = [name.strip() for name in hp.lora_targets.split(",")]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in names if name not in present]
    if missing:
        raise ConfigError(
            f"train.lora_targets: {type(model).__name__} has no module named {', '.join(missing)}; "
            "use attention, attention-mlp, all-linear or names it has"
        )
    return names


def adapter_settings(hp: TrainConfig) -> dict[str, Any]:
    """The LoRA settings of a run, as the model card and the trial record state them."""
    return {
        "r": hp.lora_r,
        "alpha": hp.lora_alpha if hp.lora_alpha is not None else hp.lora_alpha_ratio * hp.lora_r,
        "dropout": hp.lora_dropout,
        "targets": hp.lora_targets,
        "rslora": hp.lora_rslora,
        "dora": hp.lora_dora,
        "train_embeddings": hp.lora_train_embeddings,
        "quantization": hp.quantization,
    }


def with_adapter(model: Any, hp: TrainConfig, task: str) -> Any:
    """The model a run trains: ``model`` itself for full fine-tuning, else it wrapped in a LoRA adapter."""
    if hp.adapter == "none":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    settings = adapter_settings(hp)
    save = None
    if hp.lora_train_embeddings:
        embeddings = model.get_input_embeddings()
        save = [name for name, module in model.named_modules() if module is embeddings][:1]
    config = LoraConfig(
        task_type=get_task(task).peft_task_type,
        r=hp.lora_r,
        lora_alpha=settings["alpha"],
        lora_dropout=hp.lora_dropout,
        target_modules=_targets(model, hp),
        use_rslora=hp.lora_rslora,
        use_dora=hp.lora_dora,
        modules_to_save=save,
        ensure_weight_tying=bool(save),
    )
    if hp.quantization == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=hp.gradient_checkpointing)
    with warnings.catch_warnings():  # PEFT 0.21 asks transformers 5 a deprecated question; nothing for the user
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def is_adapter(model: Any) -> bool:
    return hasattr(model, "peft_config")


def kept_weights(model: Any) -> dict[str, Any]:
    """The weights a checkpoint keeps: the adapter and the head of a LoRA model, else the whole state dict."""
    if is_adapter(model):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def load_kept_weights(model: Any, state: dict[str, Any]) -> None:
    """Load what ``kept_weights`` returned into a freshly built model of the same run (every key must fit)."""
    if not is_adapter(model):
        model.load_state_dict(state)
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter weights that fit no module of the model: {', '.join(unexpected[:5])}")


def trainable_count(model: Any) -> int:
    """The parameters the optimizer steps (each shared weight once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
