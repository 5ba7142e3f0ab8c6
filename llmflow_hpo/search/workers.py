"""``search --workers N``: N worker processes on one study, each with its own share of the machine.

The usual optuna pattern: separate processes sharing one storage. Each worker is the same
``llmflow-hpo worker`` a user starts by hand on another machine, so a box of workers and a cluster of
them run the same code. On a machine with GPUs each worker sees its own device(s) (CUDA_VISIBLE_DEVICES);
the CPU cores are divided between the workers (affinity and thread count) instead of oversubscribed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import Interrupted, WorkerError
from llmflow_hpo.search.budget import ENDS_AT, Budget

__all__ = [
    "WorkerPlan",
    "plan_workers",
    "run_worker_processes",
    "visible_gpus",
    "worker_command",
    "worker_overrides",
]

Log = Callable[[str], None]


@dataclass
class WorkerPlan:
    index: int
    cores: list[int]
    threads: int
    cuda_visible_devices: str | None  # None: the worker inherits the parent's setting

    def describe(self) -> str:
        cores = f"cores {','.join(map(str, self.cores))}"
        gpu = f", GPU {self.cuda_visible_devices}" if self.cuda_visible_devices is not None else ""
        return f"worker {self.index}: {cores}, {self.threads} torch thread(s){gpu}"


def plan_workers(
    n: int, *, cores: list[int], gpus: list[str], device: str, num_threads: int | None
) -> list[WorkerPlan]:
    """Divide cores (and GPUs, when the device is auto or cuda) between ``n`` workers.

    With at least as many cores as workers each worker gets its own block of cores; with fewer, they
    share them round-robin with one thread each. GPUs the same way: a block of devices per worker, or
    round-robin sharing when there are more workers than GPUs. An explicit ``cuda:K`` or ``cpu`` is
    left as the user set it.
    """
    plans = []
    per_core = max(1, len(cores) // n)
    use_gpus = bool(gpus) and device in ("auto", "cuda")
    for i in range(n):
        mine = cores[i * per_core : (i + 1) * per_core] if n <= len(cores) else [cores[i % len(cores)]]
        visible = None
        if use_gpus:
            if n <= len(gpus):
                visible = ",".join(gpus[i * len(gpus) // n : (i + 1) * len(gpus) // n])
            else:
                visible = gpus[i % len(gpus)]
        plans.append(WorkerPlan(i, mine, num_threads or len(mine), visible))
    return plans


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, as CUDA_VISIBLE_DEVICES names them (empty without CUDA)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [x.strip() for x in env.split(",") if x.strip()][:count]
    return [str(i) for i in range(count)]


def worker_overrides(cfg: StudyConfig, plan: WorkerPlan, budget_left: float | None = None) -> list[str]:
    """``--set`` values that carry this run's settings (those a rerun may change) to a worker; the budget
    as the seconds it has left."""
    values: dict[str, Any] = {
        "n_trials": cfg.n_trials,
        "timeout": cfg.timeout,
        "budget": None if budget_left is None else max(budget_left, 1e-3),
        "cache_dir": cfg.cache_dir,
        "train.device": cfg.train.device,
        "train.num_threads": plan.threads,
    }
    for section in ("checkpoint", "heartbeat"):
        for key, value in vars(getattr(cfg, section)).items():
            values[f"{section}.{key}"] = value
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _pump(stream: Any, prefix: str, log: Log) -> None:
    for line in stream:
        log(prefix + line.rstrip("\n"))


def worker_command(cfg: StudyConfig, plan: WorkerPlan, budget: Budget | None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one worker process (``plan``); with a budget, its end."""
    env = dict(os.environ, OMP_NUM_THREADS=str(plan.threads), MKL_NUM_THREADS=str(plan.threads))
    if plan.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = plan.cuda_visible_devices
    if budget is not None:
        env[ENDS_AT] = repr(budget.ends_at)  # search.budget.Budget.joined: the worker's start-up counts
    command = [sys.executable, "-m", "llmflow_hpo", "worker", "--spawned"]
    command += ["--study", cfg.study_name, "--storage", str(cfg.storage)]
    for item in worker_overrides(cfg, plan, None if budget is None else budget.left()):
        command += ["--set", item]
    return command, env


def run_worker_processes(cfg: StudyConfig, n: int, *, log: Log, budget: Budget | None = None) -> None:
    """Start ``n`` workers on the (already created) study, wait for them, forward SIGINT/SIGTERM."""
    assert cfg.storage is not None
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    plans = plan_workers(
        n, cores=cores, gpus=visible_gpus(), device=cfg.train.device, num_threads=cfg.train.num_threads
    )
    if n > len(cores):
        log(f"workers: {n} workers on {len(cores)} cores share them, one torch thread each")
    procs: list[subprocess.Popen[str]] = []
    pumps = []
    for plan in plans:
        log(plan.describe())
        command, env = worker_command(cfg, plan, budget)
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        if hasattr(os, "sched_setaffinity"):
            try:
                os.sched_setaffinity(proc.pid, plan.cores)
            except OSError:  # the worker exited already, or affinity is not ours to set
                pass
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[w{plan.index}] ", log), daemon=True)
        pump.start()
        pumps.append(pump)

    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if not received:
            received.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for pump in pumps:
            pump.join(timeout=5)
    if received:
        raise Interrupted(received[0])
    for plan, code in zip(plans, codes, strict=True):
        if code < 0:
            log(
                f"worker {plan.index} was killed by {signal.Signals(-code).name}; "
                "its running trial is retried by the other workers (or the next search)"
            )
    failed = [plan.index for plan, code in zip(plans, codes, strict=True) if code > 0]
    if failed:
        raise WorkerError(
            f"worker(s) {', '.join(map(str, failed))} exited with an error (see their [w] lines above); "
            "rerun the command to continue the study"
        )
