"""A study's provenance: the config and search space it was made with, the library versions, and the
checks that a rerun, a worker or retrain-best reads it as it was made.

``check_same_study`` refuses to continue a study with a config that searches something else (the
settings in ``MAY_CHANGE`` may differ); ``stored_config`` reads the stored config back, with the settings
added since it was stored at the value its version used (``with_settings_added_since``).
"""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any

import optuna

from llmflow_hpo import __version__
from llmflow_hpo.config.study import StudyConfig, config_from_dict, config_to_dict
from llmflow_hpo.errors import StorageError
from llmflow_hpo.search.spaces import SearchSpace, parse_search_space
from llmflow_hpo.study import records

__all__ = [
    "MAY_CHANGE",
    "SINCE_ADDED",
    "check_same_study",
    "library_versions",
    "may_change",
    "stored_config",
    "with_settings_added_since",
]

# Changing these never changes what a study searches, so a rerun (or a worker) may change them.
MAY_CHANGE = (
    "n_trials",
    "timeout",
    "budget",
    "storage",
    "cache_dir",
    "train.device",
    "train.num_threads",
    "checkpoint.",
    "heartbeat.",
    "backend",
    "ray.",
    "tracking",
    "tracking.",
    "confirm.",  # how the confirmation stage runs (llmflow-hpo confirm), not what the search searches
    "warm_start.",
    "sampler.defaults_first",  # like warm_start, it only acts on a study that holds no trial
)


def may_change(key: str) -> bool:
    """Whether the setting ``key`` (dotted: ``train.device``) may differ between a study and its rerun or worker."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


# Settings added after studies were already stored: what the versions before them did. A stored config
# without such a setting is read with this value, so its trials retrain as they ran, and a rerun with
# today's default is told which setting to restore instead of silently training differently.
SINCE_ADDED = {
    ("train", "group_by_length"): False,  # batches were drawn uniformly at random
    ("train", "precision"): "fp32",  # fp32 on every device
    ("train", "fused_optimizer"): False,  # AdamW's foreach kernel
    ("sampler", "defaults_first"): False,  # every trial was sampled
    ("sampler", "startup"): "random",  # the sampler's own random start-up trials
    ("sampler", "startup_trials"): None,
    ("pruner", "patience"): None,  # the pruner alone
    ("objective", "cost"): None,  # the metric alone (a single-objective study)
    ("objective", "max_cost"): None,
    ("objective", "select"): "best-metric",
    ("objective", "tolerance"): 0.01,
    ("train", "num_layers"): None,  # every layer of the model
}


def with_settings_added_since(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored config with the settings it predates, at the value its version used."""
    out = json.loads(json.dumps(stored))
    for (section, key), value in SINCE_ADDED.items():
        if isinstance(out.get(section), dict):
            out[section].setdefault(key, value)
    return out


def library_versions() -> dict[str, str]:
    """The versions a new study stores (``records.VERSIONS``) and its note and model card name."""
    versions = {"llmflow-hpo": __version__}
    for dist in ("optuna", "torch", "transformers", "datasets"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("options", "config_overrides"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_study(study: optuna.Study, cfg: StudyConfig, space_raw: dict[str, Any]) -> None:
    """Refuse to continue a stored study with a config that searches something else.

    The ``train:`` value of a searched hyperparameter is not compared: every trial draws it, and the fixed
    value only placed the defaults trial, which runs in an empty study. So a study stored before a default
    changed (lr 5e-5 and batch 16 until the policy benchmark's third round) continues as it was.
    """
    attrs = study.user_attrs  # a storage query and a deep copy: read once
    stored = attrs.get(records.CONFIG)
    if stored is None:
        raise StorageError(
            f"study {study.study_name!r} in {cfg.storage} was not made by llmflow-hpo; choose another study_name"
        )
    old, new = _flatten(with_settings_added_since(stored)), _flatten(json.loads(json.dumps(config_to_dict(cfg))))
    searched = {f"train.{name}" for name in space_raw or {}}
    changed = [
        k for k in sorted(set(old) | set(new)) if not may_change(k) and k not in searched and old.get(k) != new.get(k)
    ]
    if attrs.get(records.SEARCH_SPACE) != space_raw:
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


def stored_config(study: optuna.Study) -> tuple[StudyConfig, SearchSpace, dict[str, Any]]:
    """The config and search space a study was created with, validated again."""
    attrs = study.user_attrs  # a storage query and a deep copy: read once
    raw = attrs.get(records.CONFIG)
    space_raw = attrs.get(records.SEARCH_SPACE)
    if raw is None or space_raw is None:
        raise StorageError(f"study {study.study_name!r} holds no llmflow-hpo config; it was not made by llmflow-hpo")
    source = f"study {study.study_name!r} (stored config)"
    cfg = config_from_dict(with_settings_added_since(raw), source=source, stored=True)
    return cfg, parse_search_space(space_raw, source=source, stored=True), space_raw
