"""Finding the model's files, loading its tokenizer and building the model a trial trains."""

from __future__ import annotations

import difflib
import hashlib
import importlib
from pathlib import Path
from typing import Any

from llmflow_hpo.config.study import ModelConfig
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.tasks import get_task

__all__ = [
    "DROPOUT_ATTRIBUTES",
    "LAYER_ATTRIBUTES",
    "build_model",
    "gguf_path",
    "load_tokenizer",
    "model_config",
    "model_path",
    "resolve_model_path",
    "tokenizer_fingerprint",
]

# Config attributes that hold each kind of dropout, across common encoder architectures.
DROPOUT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "hidden_dropout": ("hidden_dropout_prob", "dropout", "hidden_dropout", "resid_pdrop"),
    "attention_dropout": ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"),
}
# Config attributes that hold the number of transformer layers (train.num_layers keeps the first N).
LAYER_ATTRIBUTES = ("num_hidden_layers", "n_layers", "num_layers", "n_layer")


def resolve_model_path(name_or_path: str) -> str:
    """``package:MODULE`` becomes MODULE.get_model_path(); anything else is passed to from_pretrained as is."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    module_name = name_or_path[len("package:") :]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        hint = module_name.replace("_", "-")
        raise ConfigError(f"model.name_or_path: package {module_name!r} is not installed; pip install {hint}") from None
    getter = getattr(module, "get_model_path", None)
    if getter is None:
        raise ConfigError(f"model.name_or_path: package {module_name!r} has no get_model_path(); give a folder instead")
    return str(getter())


def gguf_path(model_cfg: ModelConfig) -> Path:
    """The GGUF file ``model.gguf_file`` names, in the ``name_or_path`` folder or package (not imported)."""
    assert model_cfg.gguf_file is not None
    name = model_cfg.name_or_path
    if name.startswith("package:"):
        from llmflow_hpo.recipe.gguf import package_folder

        return package_folder(name[len("package:") :]) / model_cfg.gguf_file
    return Path(name).expanduser() / model_cfg.gguf_file


def model_path(model_cfg: ModelConfig) -> str:
    """The folder (or hub id) the model and its tokenizer load from: for a GGUF file, its converted folder
    (made the first time, ``recipe.gguf.converted_folder``)."""
    if model_cfg.gguf_file is None:
        return resolve_model_path(model_cfg.name_or_path)
    from llmflow_hpo.recipe.gguf import converted_folder

    assert model_cfg.gguf_cache_dir is not None  # set by the config loader
    return str(converted_folder(gguf_path(model_cfg), Path(model_cfg.gguf_cache_dir)))


def load_tokenizer(model_cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    path = model_path(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ConfigError(
            f"model.name_or_path: cannot load a tokenizer from {path!r} ({str(e).splitlines()[0]}); "
            "give a local folder (nothing is downloaded at run time)"
        ) from None
    return tokenizer


def model_config(
    model_cfg: ModelConfig,
    *,
    task: str,
    labels: list[str],
    hidden_dropout: float | None,
    attention_dropout: float | None,
    num_layers: int | None = None,
) -> Any:
    """The transformers config of the model a trial trains: the task's head for ``labels``, ``model.config_overrides``
    and the trial's dropout and ``num_layers`` applied. Raises ConfigError naming the field (search's pre-flight
    uses it too).

    ``num_layers`` lowers the config's layer count: ``from_pretrained`` then builds that many layers and loads
    the pretrained weights of the first ones (``encoder.layer.0`` ...; the others' are left unused)."""
    from transformers import AutoConfig

    path = model_path(model_cfg)
    head = get_task(task)
    try:
        config = AutoConfig.from_pretrained(path, **head.head_config(labels))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.name_or_path: cannot read a model config from {path} ({str(e).splitlines()[0]}); "
            "give the folder a model was saved to"
        ) from None
    for key, value in model_cfg.config_overrides.items():
        at = f"model.config_overrides.{key}"
        if not hasattr(config, key):
            fields = sorted(k for k in config.to_dict() if not k.startswith("_"))
            hint = difflib.get_close_matches(str(key), fields, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{at}: {type(config).__name__} has no such field{extra}; fix or remove it")
        try:
            setattr(config, key, value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{at}: {type(config).__name__} refuses {value!r} ({e}); fix it") from None
    for knob, value in (("hidden_dropout", hidden_dropout), ("attention_dropout", attention_dropout)):
        if value is None:
            continue
        names = [a for a in DROPOUT_ATTRIBUTES[knob] if hasattr(config, a)]
        if not names:
            raise ConfigError(
                f"train.{knob}: {type(config).__name__} has no dropout field for it; leave it null "
                "(and out of the search space)"
            )
        for name in names:
            setattr(config, name, value)
    if num_layers is not None:
        _keep_layers(config, num_layers)
    return config


def _keep_layers(config: Any, num_layers: int) -> None:
    """Set the config's layer count to ``num_layers``, at most the model's own (ConfigError otherwise)."""
    name = next((a for a in LAYER_ATTRIBUTES if isinstance(getattr(config, a, None), int)), None)
    if name is None:
        raise ConfigError(
            f"train.num_layers: {type(config).__name__} has no layer count ({', '.join(LAYER_ATTRIBUTES)}); "
            "leave it null (and out of the search space)"
        )
    layers = getattr(config, name)
    if num_layers > layers:
        raise ConfigError(
            f"train.num_layers: {num_layers} is more than the model's {layers} layers ({name}); "
            f"use at most {layers} (in the search space too)"
        )
    setattr(config, name, num_layers)


def build_model(
    model_cfg: ModelConfig,
    *,
    task: str,
    labels: list[str],
    hidden_dropout: float | None,
    attention_dropout: float | None,
    num_layers: int | None = None,
    quantization: str = "none",
    device: Any = None,
) -> Any:
    """A freshly loaded (or randomly initialised) model with a head for ``labels``, the trial's dropout and
    its first ``num_layers`` layers (all when None), on ``device`` (the CPU when None). ``quantization`` 4bit
    loads the pretrained weights in 4-bit NF4 through bitsandbytes (QLoRA's base; a CUDA device)."""
    config = model_config(
        model_cfg,
        task=task,
        labels=labels,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        num_layers=num_layers,
    )
    auto = get_task(task).model_class()
    if quantization == "4bit":
        import torch
        from transformers import BitsAndBytesConfig

        quantized = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        path = model_path(model_cfg)
        return auto.from_pretrained(path, config=config, quantization_config=quantized, device_map={"": device})
    if model_cfg.random_init:
        model = auto.from_config(config)
    else:
        model = auto.from_pretrained(model_path(model_cfg), config=config)
    return model if device is None else model.to(device)


def tokenizer_fingerprint(model_cfg: ModelConfig, tokenizer: Any) -> str:
    """A digest of what ``tokenizer`` was loaded from (part of the tokenization cache key).

    It covers every file the tokenizer reads from the model folder: its class's vocabulary files
    (``vocab_files_names`` of the fast and the slow class: vocab.txt, vocab.json + merges.txt, a
    sentencepiece ``*.model``, ...), transformers' shared tokenizer files (tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, added_tokens.json, the chat template) and config.json,
    from which AutoTokenizer may pick the class; with the class's name and transformers' version.
    """
    import transformers
    from transformers import tokenization_utils_base as base

    path = Path(model_path(model_cfg))
    names = {
        base.FULL_TOKENIZER_FILE,
        base.TOKENIZER_CONFIG_FILE,
        base.SPECIAL_TOKENS_MAP_FILE,
        base.ADDED_TOKENS_FILE,
        base.CHAT_TEMPLATE_FILE,
        "chat_template.json",
        "config.json",
    }
    for cls in (type(tokenizer), getattr(tokenizer, "slow_tokenizer_class", None)):
        names.update(str(name) for name in getattr(cls, "vocab_files_names", {}).values())
    digest = hashlib.sha256()
    digest.update(f"{type(tokenizer).__name__} {transformers.__version__}".encode())
    if not path.is_dir():
        digest.update(str(path).encode())
    for name in sorted(names):
        f = path / name
        if f.is_file():
            digest.update(f"{name} {f.stat().st_size}".encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()
