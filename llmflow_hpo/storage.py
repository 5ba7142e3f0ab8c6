"""The study in its SQL database, through optuna's RDB storage (SQLite by default, PostgreSQL for many workers).

The study carries everything ``retrain-best`` needs: the resolved config, the search space and the
versions of the libraries that ran it (``study.user_attrs``).
"""

from __future__ import annotations

import json
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from llmflow_hpo import __version__
from llmflow_hpo.config import StudyConfig, config_from_dict, config_to_dict
from llmflow_hpo.errors import StorageError
from llmflow_hpo.spaces import SearchSpace, parse_search_space

__all__ = [
    "check_same_study",
    "default_storage_for",
    "finished_trials",
    "library_versions",
    "load_study",
    "open_storage",
    "open_study",
    "stored_config",
]

# Changing these never changes what a study searches, so a rerun may change them.
_MAY_CHANGE = {"n_trials", "timeout", "storage", "cache_dir", "train.device", "train.num_threads"}


def library_versions() -> dict[str, str]:
    versions = {"llmflow-hpo": __version__}
    for dist in ("optuna", "torch", "transformers", "datasets"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def default_storage_for(study_name: str) -> str:
    """Where ``--study NAME`` without ``--storage`` looks: the default SQLite file of a config in ./studies/."""
    path = Path("studies") / f"{study_name}.db"
    if not path.exists():
        raise StorageError(
            f"no --storage given and {path} does not exist; pass --storage URL (e.g. sqlite:///path/to/{study_name}.db)"
        )
    return f"sqlite:///{path.resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An optuna RDB storage for ``url``; SQLite waits for locks instead of failing at once."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        if not path.parent.exists():
            raise StorageError(f"storage {url}: folder {path.parent} does not exist; create it or change storage")
        engine_kwargs["connect_args"] = {"timeout": 60}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except ImportError as e:
        raise StorageError(
            f"storage {url}: database driver missing ({e}); e.g. pip install 'llmflow-hpo[postgres]'"
        ) from None
    except Exception as e:  # sqlalchemy's connection errors: one line, the URL named
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"storage {url}: cannot open ({reason})") from None


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("options", "config_overrides"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_study(study: optuna.Study, cfg: StudyConfig, space_raw: dict[str, Any]) -> None:
    """Refuse to continue a stored study with a config that searches something else."""
    stored = study.user_attrs.get("config")
    if stored is None:
        raise StorageError(
            f"study {study.study_name!r} in {cfg.storage} was not made by llmflow-hpo; choose another study_name"
        )
    old, new = _flatten(stored), _flatten(json.loads(json.dumps(config_to_dict(cfg))))
    changed = [k for k in sorted(set(old) | set(new)) if k not in _MAY_CHANGE and old.get(k) != new.get(k)]
    if study.user_attrs.get("search_space") != space_raw:
        changed.append("search_space (file contents)")
    if changed:
        shown = ", ".join(
            f"{k}: {old.get(k)!r} -> {new.get(k)!r}" if not k.startswith("search_space") else k for k in changed[:5]
        )
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise StorageError(
            f"study {study.study_name!r} already exists in {cfg.storage} with another config ({shown}{more}); "
            "restore those settings to continue it, or set a new study_name"
        )


def open_study(
    cfg: StudyConfig,
    space_raw: dict[str, Any],
    *,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    data_report: list[str],
) -> optuna.Study:
    """Create the study, or load it when it exists and was made by the same config."""
    assert cfg.storage is not None
    storage = open_storage(cfg.storage)
    exists = cfg.study_name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.study_name,
        direction=cfg.direction,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    if exists:
        if study.direction.name.lower() != cfg.direction:
            raise StorageError(
                f"study {cfg.study_name!r} in {cfg.storage} has direction {study.direction.name.lower()}; "
                f"the config says {cfg.direction}"
            )
        check_same_study(study, cfg, space_raw)
        return study
    study.set_user_attr("config", json.loads(json.dumps(config_to_dict(cfg))))
    study.set_user_attr("search_space", space_raw)
    study.set_user_attr("versions", library_versions())
    study.set_user_attr("data_report", data_report)
    study.set_user_attr("metric", cfg.metric)
    with warnings.catch_warnings():  # experimental in optuna, but it is what names the objective in the dashboard
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([f"dev_{cfg.metric}"])
    return study


def load_study(study_name: str, storage_url: str) -> optuna.Study:
    """An existing study, or a StorageError that lists the studies the storage does hold."""
    storage = open_storage(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if study_name not in names:
        held = ", ".join(names) if names else "none"
        raise StorageError(f"no study {study_name!r} in {storage_url} (studies there: {held})")
    return optuna.load_study(study_name=study_name, storage=storage)


def stored_config(study: optuna.Study) -> tuple[StudyConfig, SearchSpace, dict[str, Any]]:
    """The config and search space a study was created with, validated again."""
    raw = study.user_attrs.get("config")
    space_raw = study.user_attrs.get("search_space")
    if raw is None or space_raw is None:
        raise StorageError(f"study {study.study_name!r} holds no llmflow-hpo config; it was not made by llmflow-hpo")
    source = f"study {study.study_name!r} (stored config)"
    return config_from_dict(raw, source=source), parse_search_space(space_raw, source=source), space_raw


def finished_trials(study: optuna.Study) -> int:
    """Trials that count towards n_trials: complete or pruned."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
