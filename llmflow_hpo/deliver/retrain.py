"""retrain-best: the best trial's parameters, read from the storage alone, trained into a finished model.

When the study holds confirmation trials (``llmflow-hpo confirm``), the trial retrained is the search trial
whose configuration was confirmed best (by its mean or lcb over seeds), and the model card reports that mean
+- std. ``--train-on train`` repeats the best trial's run with its seed and its torch thread count, and stops at
the step of its best evaluation: the same weights (their SHA-256 is compared with the one the trial
stored), so the same dev score (checked and reported). ``train+dev`` trains on
both for the same number of epochs; its dev score is then no estimate, and only test counts.

The training itself is ``recipe.train.retrain``; torch is imported when it runs, not with this module.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.data.features import Features, prepare_features
from llmflow_hpo.errors import StorageError
from llmflow_hpo.recipe.adapters import kept_weights
from llmflow_hpo.search.spaces import trial_params
from llmflow_hpo.study import records
from llmflow_hpo.study.front import cost_value, metric_value
from llmflow_hpo.study.provenance import stored_config
from llmflow_hpo.study.storage import load_study
from llmflow_hpo.study.view import StudyView, confirmation_summary, mean_std_text

if TYPE_CHECKING:
    import optuna

__all__ = ["RetrainResult", "retrain_best"]


@dataclass
class RetrainResult:
    output_dir: Path
    trial_number: int
    params: dict[str, Any]
    dev_metrics: dict[str, float]
    test_metrics: dict[str, float]
    trial_dev_value: float
    reproduced: bool | None  # None when trained on train+dev (dev was seen)
    metric: str = "f1"  # the study's objective metric (the dev value compared)
    mlflow_run_id: str | None = None  # tracking.mlflow: the run that holds the model as an artifact
    confirmation: dict[str, Any] | None = None  # the confirmed winner's row (study.view.confirmation_summary)


def retrain_best(
    *,
    study_name: str,
    storage: str,
    output_dir: Path | None = None,
    train_on: Literal["train", "train+dev"] = "train",
    merge: bool = False,
    log: Callable[[str], None] | None = None,
    study: optuna.Study | None = None,
) -> RetrainResult:
    """Retrain the best trial of ``study_name`` (``study``: already loaded from ``storage``); ``merge``: a LoRA
    trial's model is also written merged into its weights (``merged/``)."""
    from llmflow_hpo.deliver.export import check_output_dir, save_model
    from llmflow_hpo.recipe.evaluation import weights_digest
    from llmflow_hpo.recipe.train import retrain

    say = log or (lambda line: print(line, file=sys.stderr))
    out = Path(output_dir) if output_dir else Path("runs") / study_name / "best-model"
    check_output_dir(out)
    if study is None:
        study = load_study(study_name, storage)
    cfg, space, space_raw = stored_config(study)
    view = StudyView.of(study)
    best, confirmation = _confirmed_or_best(view, study_name, cfg.metric, say)
    params = trial_params(best, space)
    _say_if_pbt(best, say)
    seed = int(best.user_attrs.get(records.SEED, cfg.seed))
    if train_on == "train":
        _take_the_trials_threads(cfg, best, say)
    value = metric_value(best)
    cost = f" {cfg.objective.cost}={cost_value(best):.4g}" if view.objective else ""  # a cost study's pick
    say(f"retrain-best: study {study_name}, trial {best.number} (dev {cfg.metric}={value:.4f}{cost}), params {params}")
    features = prepare_features(cfg, log=say)
    split, stop_at = _training_split(features, int(best.user_attrs[records.BEST_STEP]), train_on, say)
    result = retrain(cfg, params, features, seed=seed, stop_at_examples=stop_at, train_split=split, evaluate_test=True)
    assert result.final is not None
    dev = result.final.metrics
    weights = weights_digest(kept_weights(result.model))
    trial_weights = best.user_attrs.get(records.BEST_WEIGHTS_SHA256)
    reproduced = None
    if train_on == "train":
        # The same weights, when the trial stored their digest (studies before it: the same dev score).
        same_score = math.isclose(dev[cfg.metric], value, abs_tol=1e-9)
        reproduced = same_score and (trial_weights is None or trial_weights == weights)
    save_model(
        out,
        model=result.model,
        cfg=cfg,
        space_raw=space_raw,
        study=study,
        n_trials=len(view.trials),
        trial=best,
        params=params,
        seed=seed,
        train_on=train_on,
        dev_metrics=dev,
        test_metrics=result.test_metrics,
        reproduced=reproduced,
        examples_seen=result.final.examples_seen,
        weights_sha256={"model": weights, "trial": trial_weights},
        confirmation=confirmation,
        merge=merge,
        test_samples=result.test_samples,
    )
    retrained = RetrainResult(
        out,
        best.number,
        params,
        dev,
        result.test_metrics,
        value,
        reproduced,
        metric=cfg.metric,
        confirmation=confirmation,
    )
    if cfg.tracking.mlflow:
        from llmflow_hpo.views.tracking import track_retrain

        retrained.mlflow_run_id = track_retrain(cfg, study, retrained, out, train_on=train_on, log=say)
    return retrained


def _confirmed_or_best(
    view: StudyView, study_name: str, metric: str, say: Callable[[str], None]
) -> tuple[Any, dict[str, Any] | None]:
    """The trial to retrain: the search trial whose configuration the confirmation stage picked (its mean or
    lcb over seeds, ``llmflow-hpo confirm``), with that confirmation's row; else the best search trial."""
    summary = confirmation_summary(view)
    won = summary["winner"] if summary is not None else None
    if won is None:
        return _best_trial(view, study_name), None
    source = next((t for t in view.trials if t.number == won["confirms"]), None)
    if source is None or records.BEST_STEP not in source.user_attrs:
        raise StorageError(
            f"study {study_name!r}: the confirmed configuration's search trial {won['confirms']} is gone"
        )
    row = {**won, "select": summary["select"], "confidence": summary["confidence"], "metric": metric}
    say(
        f"retrain-best: the confirmed winner, trial {won['trial']}: configuration of search trial {source.number}, "
        f"{mean_std_text(won, metric)} (selected by {summary['select']})"
    )
    return source, row


def _best_trial(view: StudyView, study_name: str) -> Any:
    """The study's best trial (the study view's rule), refused when there is none or llmflow-hpo did not run it."""
    best = view.best
    if best is None:
        raise StorageError(f"study {study_name!r} {view.why_no_best()}")
    if records.BEST_STEP not in best.user_attrs:
        raise StorageError(
            f"trial {best.number} of study {study_name!r} has no best_step; it was not run by llmflow-hpo"
        )
    return best


def _say_if_pbt(best: Any, say: Callable[[str], None]) -> None:
    schedule = best.user_attrs.get(records.PBT_SCHEDULE)
    if schedule:
        say(
            f"retrain-best: trial {best.number} ran under PBT, which changed its parameters while it trained "
            f"({len(schedule)} time(s), see its pbt_schedule); retraining uses the "
            "parameters it started with, so its dev score will differ"
        )


def _take_the_trials_threads(cfg: StudyConfig, best: Any, say: Callable[[str], None]) -> None:
    """Train with the torch thread count the trial ran with, where it differs from what this run would use."""
    import torch

    threads = best.user_attrs.get(records.TORCH_THREADS)
    if threads and (cfg.train.num_threads or torch.get_num_threads()) != threads:
        # CPU reductions (matmuls, sums) split their work by thread count, so the weights depend on it.
        cfg.train = dataclasses.replace(cfg.train, num_threads=int(threads))
        say(f"retrain-best: {threads} torch threads, as trial {best.number} ran with (its weights depend on it)")


def _training_split(features: Features, best_step: int, train_on: str, say: Callable[[str], None]) -> tuple[str, int]:
    """The split to train on and the examples to stop at: the trial's best step, or as many epochs of train+dev."""
    if train_on == "train":
        return "train", best_step
    import datasets

    merged = datasets.concatenate_datasets([features.splits["train"], features.splits["dev"]])
    features.splits["train+dev"] = merged
    epochs = best_step / len(features.splits["train"])
    say(f"retrain-best: training on train+dev ({len(merged)} examples) for {epochs:.2f} epochs, as the best trial")
    return "train+dev", math.ceil(epochs * len(merged))
