"""Backends run the trial loop of a study: optuna workers (this package's default) or, later, Ray Tune."""

from __future__ import annotations

from llmflow_hpo.backends.optuna_backend import SearchSummary, run_search

__all__ = ["SearchSummary", "run_search"]
