"""The trials a new study starts with, queued before the sampler draws anything.

- The recipe's defaults (``sampler.defaults_first``): the ``train:`` section's values of the searched
  hyperparameters, projected into the search space, so that the study's best is at least what not
  searching gives. A searched value whose default is null (a dropout that keeps the model's own) is left
  to the sampler.
- A warm start (``warm_start``): the best distinct configurations of an earlier study of the same task,
  projected into this space.

They are optuna's enqueued trials (``study.enqueue_trial``), tagged with ``records.ORIGIN``, queued once,
while the study holds no trial at all (under the study lock, so two searches starting together queue
them once). Not under Ray's PBT scheduler: its population is Ray's own random variants, which never ask
the study, so a queued trial would wait for ever. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import ConfigError, StorageError
from llmflow_hpo.search.spaces import SearchSpace
from llmflow_hpo.study import records
from llmflow_hpo.study.lock import StudyLock
from llmflow_hpo.tasks import get_task

__all__ = ["default_params", "project", "queue_first_trials", "warm_start_params"]

DEFAULTS = "defaults"
WARM_START = "warm-start"


def _nearest_step(value: float, low: float, step: float, high: float) -> float:
    k = round((value - low) / step)
    return min(low + k * step, low + math.floor((high - low) / step + 1e-9) * step)


def project(value: Any, dist: BaseDistribution) -> Any:
    """``value`` as a point of ``dist``: clipped into a range (on its step), or the nearest choice.

    A choice that is not among the categorical choices becomes the numerically nearest one (a tie: the
    smaller), or the first choice when the values are not numbers.
    """
    if isinstance(dist, CategoricalDistribution):
        if value in dist.choices:
            return value
        numeric = [c for c in dist.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and numeric:
            return min(numeric, key=lambda c: (abs(c - value), c))
        return dist.choices[0]
    if isinstance(dist, IntDistribution):
        clipped = min(max(round(value), dist.low), dist.high)
        return int(_nearest_step(clipped, dist.low, dist.step, dist.high))
    assert isinstance(dist, FloatDistribution)
    clipped = min(max(float(value), dist.low), dist.high)
    return _nearest_step(clipped, dist.low, dist.step, dist.high) if dist.step is not None else clipped


def default_params(cfg: StudyConfig, space: SearchSpace) -> dict[str, Any]:
    """The recipe's defaults of the searched hyperparameters, as a point of ``space`` (null ones left out)."""
    params = {}
    for name, dist in space.items():
        value = getattr(cfg.train, name, None)
        if value is not None:
            params[name] = project(value, dist)
    return params


def warm_start_params(
    cfg: StudyConfig, space: SearchSpace, queued: list[dict[str, Any]] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The earlier study's best distinct complete configurations, projected into ``space``, best first, each
    with where it came from (``study#N``); none that is among ``queued`` already (the defaults trial: the
    earlier study's own defaults trial is often among its best). Refused when that study is missing or of
    another task."""
    from llmflow_hpo.study.provenance import stored_config
    from llmflow_hpo.study.storage import open_storage
    from llmflow_hpo.study.view import ranked

    warm = cfg.warm_start
    assert warm.study is not None
    url = warm.storage or cfg.storage
    try:
        earlier = optuna.load_study(study_name=warm.study, storage=open_storage(str(url)))
    except KeyError:
        raise ConfigError(
            f"warm_start.study: no study {warm.study!r} in {url}; name an existing study (llmflow-hpo studies lists them)"
        ) from None
    try:
        earlier_cfg, _, _ = stored_config(earlier)
    except StorageError as e:
        raise ConfigError(f"warm_start.study: {e}") from None
    if get_task(earlier_cfg.task) is not get_task(cfg.task):
        raise ConfigError(
            f"warm_start.study: {warm.study!r} is a {earlier_cfg.task} study, this one {cfg.task}; "
            "warm-start from a study of the same task"
        )
    picked: list[tuple[str, dict[str, Any]]] = []
    seen: list[dict[str, Any]] = list(queued or [])
    defaults = default_params(cfg, space)
    for trial in ranked(earlier.get_trials(deepcopy=False), earlier_cfg.direction):
        params = {**defaults, **{n: project(v, space[n]) for n, v in trial.params.items() if n in space}}
        if params not in seen:
            seen.append(params)
            picked.append((f"{warm.study}#{trial.number}", params))
        if len(picked) == warm.top:
            break
    return picked


def queue_first_trials(study: optuna.Study, cfg: StudyConfig, space: SearchSpace, say: Callable[[str], None]) -> None:
    """Queue the defaults trial and the warm start's trials in a study that holds no trial yet."""
    wanted = cfg.sampler.defaults_first and cfg.sampler.name != "grid"  # a grid covers its points itself
    if not wanted and cfg.warm_start.study is None:
        return
    assert cfg.storage is not None
    lock = StudyLock(cfg.storage, cfg.study_name)
    try:
        with lock.held():
            if study.get_trials(deepcopy=False):
                return
            if cfg.backend == "ray" and cfg.ray.scheduler == "pbt":
                say(f"study {cfg.study_name}: Ray's PBT draws its own population; no defaults or warm-start trial")
                return
            params = default_params(cfg, space)
            if not params:  # every searched value's default is null (the model's own dropout): no such trial
                wanted = False
            warm = warm_start_params(cfg, space, [params] if wanted else []) if cfg.warm_start.study else []
            if wanted:
                study.enqueue_trial(params, user_attrs={records.ORIGIN: DEFAULTS})
                shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
                say(f"study {cfg.study_name}: the first trial runs the recipe's defaults ({shown})")
            for origin, params in warm:
                study.enqueue_trial(params, user_attrs={records.ORIGIN: WARM_START, records.WARM_START_FROM: origin})
            if warm:
                say(f"study {cfg.study_name}: {len(warm)} trial(s) warm-started from {', '.join(o for o, _ in warm)}")
    finally:
        lock.close()
