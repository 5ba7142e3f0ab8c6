"""How a run uses its device: the device, precision, TF32, fused AdamW and pinned memory it runs with.

``resolve_runtime`` chooses them from ``train.device`` and ``train.precision``; ``runtime_attrs`` is
what every trial stores of them; ``device_settings`` holds torch's process-wide settings (threads,
matmul precision) for the length of one run and frees the device's memory after it.
"""

from __future__ import annotations

import gc
import resource
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from llmflow_hpo.config.study import StudyConfig, TrainConfig
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.study import records

__all__ = ["Runtime", "device_settings", "peak_memory", "resolve_device", "resolve_runtime", "runtime_attrs"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name} asked for, but torch sees no CUDA device; use auto or cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Runtime:
    """How a run uses its device, chosen from the device and ``train.precision``; stored with every trial."""

    device: torch.device
    precision: str  # fp32, bf16 (autocast) or fp16 (autocast with loss scaling)
    tf32: bool  # fp32 matmuls on TF32 tensor cores (Ampere and later)
    fused_optimizer: bool  # AdamW's fused kernel (CPU or CUDA)
    pin_memory: bool  # page-locked batches, copied with non_blocking=True

    def autocast(self) -> AbstractContextManager[Any]:
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def attrs(self) -> dict[str, Any]:
        return {
            records.DEVICE: str(self.device),
            records.PRECISION: self.precision,
            records.TF32: self.tf32,
            records.FUSED_OPTIMIZER: self.fused_optimizer,
            records.PIN_MEMORY: self.pin_memory,
        }


def runtime_attrs(cfg: StudyConfig, params: dict[str, Any], runtime: Runtime | None = None) -> dict[str, Any]:
    """What a trial with ``params`` runs with (device, precision, TF32, fused optimizer, pinned memory,
    length grouping): the trial's user attributes, written when it starts."""
    hp = cfg.train.with_params(params)  # the searched values over the fixed ones (config/hyperparameters.py)
    return {**(runtime or resolve_runtime(hp)).attrs(), records.GROUP_BY_LENGTH: hp.group_by_length}


def resolve_runtime(hp: TrainConfig, device: torch.device | None = None) -> Runtime:
    """On a GPU: bf16 where it has it (else fp16 with loss scaling), TF32, pinned memory.

    On CPU everything stays fp32 unless ``train.precision`` asks for bf16. AdamW runs torch's fused
    kernel on both (``train.fused_optimizer``), which torch has for CPU and CUDA tensors.
    """
    device = device or resolve_device(hp.device)
    cuda = device.type == "cuda"
    precision = hp.precision
    if precision == "auto":
        precision = "fp32"
        if cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision == "fp16" and not cuda:
        raise ConfigError(f"train.precision: fp16 needs a GPU and this run is on {device}; use fp32 or bf16")
    return Runtime(
        device=device,
        precision=precision,
        tf32=cuda and torch.cuda.get_device_capability(device)[0] >= 8,
        fused_optimizer=hp.fused_optimizer and hp.optimizer == "adamw" and device.type in ("cpu", "cuda"),
        pin_memory=cuda,
    )


@contextmanager
def device_settings(hp: TrainConfig, runtime: Runtime) -> Iterator[None]:
    """For one run: TF32 matmuls and ``train.num_threads`` as asked, the peak-memory count from zero.

    On the way out (the run's objects already dropped by the recipe) torch's settings are put back and
    the memory the run held is returned: nothing of a trial outlives it.
    """
    device = runtime.device
    threads_before = torch.get_num_threads()
    matmul_precision_before = torch.get_float32_matmul_precision()
    if runtime.tf32:
        torch.set_float32_matmul_precision("high")
    if hp.num_threads is not None:
        torch.set_num_threads(hp.num_threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        torch.set_float32_matmul_precision(matmul_precision_before)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def peak_memory(device: torch.device) -> tuple[float, str]:
    """The run's peak memory in MiB and what was measured (CUDA's allocator, or the process's peak RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20, "process_max_rss"
