"""Backends run the trials of a study: optuna workers (the default) or Ray Tune (``backend: ray``).

Both write the same study to the same storage, so ``trials``, ``best``, ``retrain-best`` and
optuna-dashboard read a study the same whichever backend ran it. ``run_search`` hands the study to
``search.driver.run_search`` with the backend's ``TrialRunner``. Ray is imported only here, and only
when a study asks for it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.search.driver import SearchSummary

__all__ = ["RAY_HINT", "SearchSummary", "import_ray_backend", "ray_environment", "ray_missing", "run_search"]

RAY_HINT = "pip install 'llmflow-hpo[ray]'"


def ray_missing() -> bool:
    """True when Ray Tune cannot be imported here, checked without importing Ray (``find_spec("ray.tune")``
    would import ``ray`` itself, before ``ray_environment`` had set Ray's environment)."""
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("ray")
    except (ImportError, ValueError):
        return True
    if spec is None or not spec.submodule_search_locations:
        return True
    return not any((Path(folder) / "tune").is_dir() for folder in spec.submodule_search_locations)


def ray_environment(*, local: bool) -> None:
    """Set Ray's environment variables; called before Ray's first import in this process (it reads them then).

    A local Ray binds to 127.0.0.1 only: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 when it is imported
    (its single-machine mode) and then starts every server on the loopback address.
    """
    if local and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ray warns when its experiment state is saved often: it is, on purpose (after each trial checkpoint).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def import_ray_backend(*, local: bool) -> ModuleType:
    """``backends.ray_backend.runs`` (which imports Ray), or a one-line error with the install hint."""
    ray_environment(local=local)
    try:
        from llmflow_hpo.search.backends.ray_backend import runs
    except ImportError as e:
        if (e.name or "").split(".")[0] != "ray":
            raise
        raise ConfigError(f"backend: ray needs Ray Tune, which is not installed; {RAY_HINT}") from None
    return runs


def run_search(
    cfg: StudyConfig,
    space: Any,
    space_raw: dict[str, Any],
    *,
    workers: int = 1,
    new_study: bool = False,
    log: Callable[[str], None] | None = None,
    source: str = "config",
    data: Any = None,
) -> SearchSummary:
    """Run (or continue) the study with the backend its config names. ``data``: the splits already read
    (``features.read_splits``), tokenized without reading the files again."""
    from llmflow_hpo.search import driver

    trials: driver.TrialRunner
    if cfg.backend == "ray":
        if workers != 1:
            raise ConfigError(
                f"--workers {workers}: backend ray runs its trials through Ray; set ray.max_concurrent_trials "
                "(and ray.cpus_per_trial / ray.gpus_per_trial) instead"
            )
        trials = import_ray_backend(local=cfg.ray.address is None).RayTrials()
    else:
        from llmflow_hpo.search.backends.optuna_backend import OptunaTrials

        trials = OptunaTrials(workers)
    return driver.run_search(cfg, space, space_raw, trials, new_study=new_study, log=log, source=source, data=data)
