"""llmflow-hpo: hyperparameter search for transformer fine-tuning, in one command."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
