"""Backends run the trials of a study: optuna workers (the default) or Ray Tune (``backend: ray``).

Both write the same study to the same storage, so ``trials``, ``best``, ``retrain-best`` and
optuna-dashboard read a study the same whichever backend ran it. ``run_search`` hands the study to
``search.driver.run_search`` with the backend's ``TrialRunner``. Ray is imported only here, and only
when a study asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import ConfigError
from llmflow_hpo.search.backends.ray_backend import RAY_HINT, ray_environment, ray_missing
from llmflow_hpo.search.driver import SearchSummary

__all__ = ["RAY_HINT", "import_ray_backend", "ray_missing", "run_search"]


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
