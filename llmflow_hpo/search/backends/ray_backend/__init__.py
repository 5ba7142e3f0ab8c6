"""The Ray Tune backend: the same study, its trials run by Ray Tune on a local Ray or a cluster.

What comes from where:

- Parameters: Ray's ``OptunaSearch`` asks the study's own sampler (the configured one, seeded per trial)
  over the study's optuna distributions, in the study itself: the trials it asks are the study's trials.
  PBT cannot run with a search algorithm (Ray refuses it), so its population is drawn at random by Ray
  from the same distributions, and each Ray trial becomes a study trial when it starts.
- Stopping: a Ray scheduler (ASHA, HyperBand, median stopping, PBT) instead of the optuna pruner. Its time
  unit is training examples seen, the step every evaluation is reported at in both backends (HyperBand:
  evaluations, see ``schedulers.build_scheduler``).
- Recording: ``recorder.StudyRecorder``, a Ray Tune callback in the driver, writes every evaluation and the
  end of every trial into the study. Only the driver needs the storage; Ray's workers never open it.
- Resume: ``runs.RayTrials`` restores an interrupted Ray run before it starts a new one.

Modules by concern: ``trainable`` (what a Ray worker runs per trial), ``recorder`` (the driver's callback
and searcher), ``schedulers`` (schedulers, domains, PBT's mutations; validate's rules too), ``session``
(Ray itself), ``runs`` (this backend's part of ``search.driver.run_search``). The package itself holds only
what runs before Ray may be imported (``ray_missing``, ``ray_environment``) and imports no Ray: ``schedulers``
is imported alone by ``validate``, the rest by ``backends.import_ray_backend`` after it set Ray's environment.
"""

from __future__ import annotations

import os
import sys

__all__ = ["RAY_HINT", "ray_environment", "ray_missing"]

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
