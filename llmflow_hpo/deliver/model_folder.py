"""A finished model folder (``retrain-best``'s output) opened for use: its study config, labels and scores, the
model loaded for inference (PyTorch, or its exported ONNX graphs), and what ``serve``'s ``/info`` says of it.

Opening reads JSON and YAML only (no torch): ``predict``, ``serve`` and ``export`` refuse a folder that is not
a model in one line before any heavy import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmflow_hpo.config.study import StudyConfig, config_from_dict
from llmflow_hpo.errors import LlmflowError
from llmflow_hpo.study.provenance import with_settings_added_since
from llmflow_hpo.tasks import BaseTask, get_task

__all__ = ["ONNX_FILES", "ModelFolder"]

# The exported graphs, in the model folder's onnx/ (llmflow-hpo export --format onnx).
ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}


@dataclass
class ModelFolder:
    """A model folder: where it is, the study config it was trained with, its best parameters, labels, scores."""

    path: Path
    cfg: StudyConfig
    params: dict[str, Any]
    labels: list[str]
    metrics: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> ModelFolder:
        """Read the folder's metrics.json, study_config.yaml and labels.json; a LlmflowError naming what is
        missing for a folder that ``retrain-best`` did not write."""
        folder = Path(path)
        if not folder.is_dir():
            raise LlmflowError(f"{folder}: no such model folder; give the folder retrain-best wrote (--output)")
        for name in ("metrics.json", "study_config.yaml"):
            if not (folder / name).is_file():
                raise LlmflowError(
                    f"{folder}: not an llmflow-hpo model folder (no {name}); give the folder retrain-best wrote"
                )
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
            resolved = yaml.safe_load((folder / "study_config.yaml").read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise LlmflowError(f"{folder}: metrics.json or study_config.yaml is not readable ({e})") from None
        cfg = config_from_dict(
            with_settings_added_since(resolved["config"]), source=f"{folder / 'study_config.yaml'}", stored=True
        )
        labels: list[str] = []
        if (folder / "labels.json").is_file():
            labels = list(json.loads((folder / "labels.json").read_text())["labels"])
        return cls(folder, cfg, dict(resolved.get("best_params") or {}), labels, metrics)

    @property
    def task(self) -> BaseTask:
        return get_task(self.cfg.task)

    @property
    def hp(self) -> Any:
        """The trained configuration's ``train:`` settings (the best trial's values over the fixed ones)."""
        return self.cfg.train.with_params(self.params)

    def onnx_path(self, variant: str) -> Path:
        """The exported graph ``variant`` (fp32, int8), or a LlmflowError that says how to make it."""
        path = self.path / "onnx" / ONNX_FILES[variant]
        if not path.is_file():
            raise LlmflowError(
                f"{self.path}: no {variant} ONNX model ({path.relative_to(self.path)}); run "
                f"`llmflow-hpo export {self.path} --format onnx` first"
            )
        return path

    def info(self) -> dict[str, Any]:
        """What the model is and where it came from: ``serve``'s ``GET /info``."""
        m = self.metrics
        return {
            "task": self.cfg.task,
            "labels": self.labels,
            "model": self.cfg.model.name_or_path,
            "study": m.get("study"),
            "trial": m.get("trial"),
            "metric": m.get("metric"),
            "trial_dev_value": m.get("trial_dev_value"),
            "dev": m.get("dev", {}),
            "test": m.get("test", {}),
            "params": self.params,
            "max_length": self.cfg.data.max_length,
            "adapter": (m.get("adapter") or {}).get("lora"),
            "created": m.get("created"),
            "versions": m.get("versions", {}),
        }

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    def load_model(self, device: Any) -> Any:
        """The PyTorch model in eval mode on ``device``: the weights as saved, a LoRA model's ``merged/`` when
        it was written, else its adapter on the base model named in adapter_config.json, merged for speed."""
        task = self.task
        auto = task.model_class()
        if not (self.path / "adapter_config.json").is_file():
            model = auto.from_pretrained(self.path)
        elif (self.path / "merged").is_dir():
            model = auto.from_pretrained(self.path / "merged")
        else:
            model = self._adapter_model(auto, task)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = True
        return model.to(device).eval()

    def _adapter_model(self, auto: Any, task: BaseTask) -> Any:
        from peft import PeftModel

        base = json.loads((self.path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).exists():
            raise LlmflowError(
                f"{self.path}: the adapter's base model {base!r} is not on this machine; retrain-best --merge "
                "writes a folder that needs no base model"
            )
        model = auto.from_pretrained(base, **(task.head_config(self.labels) if task.labelled else {}))
        return PeftModel.from_pretrained(model, self.path).merge_and_unload()
