"""Experiment tracking: the study's trials as MLflow runs and TensorBoard event files.

``tracking.mlflow``: one MLflow run for the study (its id kept in the study, so reruns, workers and
``retrain-best`` nest under the same run) and one child run per trial: its parameters, every evaluation's
dev metrics and training loss at its step (training examples seen, the unit of the study's curves), its
state and best metrics when it ends; ``retrain-best`` adds a child run with the test score and the model
as an artifact. ``tracking.tensorboard``: an event-file folder per trial (``DIR/STUDY/trial-NNNN``).

Tracking is optional and never stops a search: a tracker whose call fails is reported once, in one line,
and switched off for the rest of the process.

Who calls what: the process that trains a trial calls ``trial_started`` and ``evaluation`` (the optuna
backend's objective), the worker loop calls ``trial_finished`` with the trial as stored. With the Ray
backend, the driver's study recorder makes all three calls from the results Ray reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.study import records
from llmflow_hpo.study.front import metric_value
from llmflow_hpo.study.urls import sqlite_path, sqlite_url
from llmflow_hpo.study.view import StudyView

__all__ = ["Tracking", "open_tracking", "search_tracking", "track_retrain"]

Log = Callable[[str], None]

# MLflow's end states for optuna's.
_MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


class Tracker:
    """What a tracker is told. Every method may raise: ``Tracking`` catches, reports once and stops calling it."""

    name = "tracker"
    where = ""

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        """A trial begins training here (a retried trial begins again, under its new number)."""

    def evaluation(self, number: int, step: int, metrics: dict[str, float], train_loss: float | None) -> None:
        """One dev evaluation of a running trial, at ``step`` training examples seen."""

    def trial_finished(self, trial: Any) -> None:
        """The trial as stored (an optuna FrozenTrial): COMPLETE, PRUNED or FAIL, with its user attributes."""

    def study_finished(self, best: Any, status: str) -> None:
        """This process's search ended (``status``: FINISHED, KILLED when interrupted, FAILED on an error);
        ``best`` is the study's best trial or None."""

    def close(self) -> None:
        """Release what is open; trials still open (an interrupted run) end as killed."""


class Tracking:
    """The study's trackers behind one object; a failing tracker is reported once and switched off."""

    def __init__(self, trackers: list[Tracker], log: Log) -> None:
        self.trackers = trackers
        self.log = log

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # tracking never breaks a search
                self.trackers.remove(tracker)
                self.log(
                    f"tracking: {tracker.name} ({tracker.where}) failed and is off for the rest of this run: "
                    f"{_reason(e)}; the search goes on"
                )
                with contextlib.suppress(Exception):
                    tracker.close()

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        self._each("trial_started", number, params)

    def evaluation(self, number: int, step: int, metrics: dict[str, float], train_loss: float | None) -> None:
        self._each("evaluation", number, step, metrics, train_loss)

    def trial_finished(self, trial: Any) -> None:
        self._each("trial_finished", trial)

    def study_finished(self, best: Any, status: str = "FINISHED") -> None:
        self._each("study_finished", best, status)

    def close(self) -> None:
        self._each("close")
        self.trackers = []


def open_tracking(cfg: StudyConfig, study: Any, *, log: Log, owner: bool = False) -> Tracking:
    """The trackers the config asks for. One that cannot start is reported (one line) and left out.

    The study's MLflow run is made by the first process that opens tracking on the study (``search``
    opens it before it starts workers) and found in the study by the others. Only its ``owner`` (the
    search, which ends it) sets it RUNNING again; workers and retrain-best only add child runs.
    """
    trackers: list[Tracker] = []
    t = cfg.tracking
    if t.mlflow:
        try:
            trackers.append(MlflowTracker(cfg, study, owner=owner))
        except ImportError:
            log(
                "tracking: mlflow is not installed (pip install 'llmflow-hpo[tracking]'); the search goes on without it"
            )
        except Exception as e:
            log(
                f"tracking: mlflow at {mlflow_uri(cfg, study)} cannot start ({_reason(e)}); the search goes on without it"
            )
    if t.tensorboard:
        try:
            trackers.append(TensorBoardTracker(cfg))
        except ImportError:
            log("tracking: tensorboard is not installed (pip install tensorboard); the search goes on without it")
        except Exception as e:
            log(
                f"tracking: tensorboard in {tensorboard_dir(cfg)} cannot start ({_reason(e)}); the search goes on without it"
            )
    return Tracking(trackers, log)


@contextlib.contextmanager
def search_tracking(cfg: StudyConfig, study: Any, *, log: Log) -> Iterator[Tracking]:
    """A search's trackers, opened as the owner of the study's run (either backend's ``run_search``).

    When the search ends, the study's run gets the best trial and ends FINISHED, KILLED (Ctrl-C, SIGTERM)
    or FAILED (an error).
    """
    tracking = open_tracking(cfg, study, log=log, owner=True)
    status = "FAILED"
    try:
        yield tracking
        status = "FINISHED"
    except KeyboardInterrupt:  # Interrupted too
        status = "KILLED"
        raise
    finally:
        if tracking.trackers:  # the trials are read only for a tracker to be told the best one
            tracking.study_finished(StudyView.of(study).best, status)  # a cost study's: objective.select's pick
        tracking.close()


def mlflow_uri(cfg: StudyConfig, study: Any) -> str:
    """The tracking URI: the config's (resolved beside the study config by the loader), else, for a worker
    that turned tracking on with ``--set``, $MLFLOW_TRACKING_URI, the study's MLflow run's, or ./mlflow.db."""
    stored = study.user_attrs.get(records.MLFLOW) or {}
    return (
        cfg.tracking.mlflow_tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or stored.get("tracking_uri")
        or sqlite_url(Path("mlflow.db"))
    )


def tensorboard_dir(cfg: StudyConfig) -> Path:
    """The event files' folder: the config's, else (a worker with ``--set``) ./tensorboard."""
    return Path(cfg.tracking.tensorboard_dir or "tensorboard").resolve()


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------
# MLflow


def _quick_http_failures(uri: str) -> None:
    """A remote tracking server that went away should cost seconds, not MLflow's default minutes of
    retries (7 retries with backoff, 120 s timeouts). The user's own settings win."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _mlflow_client(uri: str) -> Any:
    import logging

    _quick_http_failures(uri)
    from mlflow.tracking import MlflowClient

    # After the import, which sets mlflow's level: no migration lines on a new SQLite store in the progress.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside it (mlartifacts/), not into the working directory."""
    path = sqlite_path(uri)
    return (path.parent / "mlartifacts").resolve().as_uri() if path is not None else None


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri))
    except Exception:  # another worker created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]
    return out


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, cfg: StudyConfig, study: Any, *, owner: bool = False) -> None:
        uri = mlflow_uri(cfg, study)
        self.cfg, self.study, self.owner, self.where = cfg, study, owner, uri
        self.client = _mlflow_client(uri)
        self.experiment_id = _experiment_id(self.client, cfg.tracking.mlflow_experiment or cfg.study_name, uri)
        self.parent_run_id = self._study_run()
        self.runs: dict[int, str] = {}  # trial number -> its open run

    def _study_run(self) -> str:
        """The study's run: the one the study names (continued), else a new one, recorded in the study.

        The owner (the search) runs it: RUNNING until ``study_finished``. Anyone else only hangs child runs
        under it, and a study run it has to make is finished at once (nobody else would end it).
        """
        from mlflow.entities import RunStatus

        stored = self.study.user_attrs.get(records.MLFLOW) or {}
        if stored.get("tracking_uri") == self.where and stored.get("run_id"):
            try:
                run = self.client.get_run(stored["run_id"])
            except Exception:  # deleted from the tracking store: start a new one
                run = None
            if run is not None and run.info.lifecycle_stage != "deleted":
                if self.owner and run.info.status != "RUNNING":
                    self.client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
                return run.info.run_id
        cfg = self.cfg
        run = self.client.create_run(
            self.experiment_id,
            run_name=cfg.study_name,
            tags={
                "llmflow.study": cfg.study_name,
                "llmflow.storage": str(cfg.storage),
                "llmflow.kind": "study",
                "mlflow.note.content": _study_description(cfg, self.study),
            },
        )
        run_id = run.info.run_id
        fixed = {
            "task": cfg.task,
            "model": cfg.model.name_or_path,
            "metric": records.dev(cfg.metric),
            "direction": cfg.direction,
            "sampler": cfg.sampler.name,
            "pruner": cfg.pruner.name,
            "n_trials": cfg.n_trials,
            "seed": cfg.seed,
            "backend": cfg.backend,
        }
        self._log_params(run_id, fixed)
        self.client.log_dict(run_id, self.study.user_attrs.get(records.CONFIG) or {}, "study/config.json")
        self.client.log_dict(run_id, self.study.user_attrs.get(records.SEARCH_SPACE) or {}, "study/search_space.json")
        self.study.set_user_attr(
            records.MLFLOW, {"tracking_uri": self.where, "experiment_id": self.experiment_id, "run_id": run_id}
        )
        if not self.owner:
            self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in _flat_params(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{number}",
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "llmflow.study": self.cfg.study_name,
                "llmflow.trial": str(number),
                "llmflow.kind": "trial",
            },
        )
        self.runs[number] = run.info.run_id
        self._log_params(run.info.run_id, params)

    def evaluation(self, number: int, step: int, metrics: dict[str, float], train_loss: float | None) -> None:
        from mlflow.entities import Metric

        run_id = self.runs.get(number)
        if run_id is None:
            return
        now = int(time.time() * 1000)
        batch = [Metric(records.dev(k), float(v), now, step) for k, v in metrics.items()]
        if train_loss is not None:
            batch.append(Metric("train_loss", float(train_loss), now, step))
        self.client.log_batch(run_id, metrics=batch)

    def trial_finished(self, trial: Any) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self.runs.get(trial.number)
        if run_id is None:
            return
        state = trial.state.name
        tags = [RunTag("llmflow.state", state)]
        for key in records.tag_names():  # the attributes of kind tag: what happened, where
            if trial.user_attrs.get(key) is not None:
                tags.append(RunTag(f"llmflow.{key}", str(trial.user_attrs[key])[:5000]))
        # The trial's summary: the best evaluation's dev metrics and the run's costs (kind metric), logged once.
        now = int(time.time() * 1000)
        summary = [
            Metric(f"best_{k}" if k.startswith(records.DEV_PREFIX) else k, float(v), now, 0)
            for k, v in trial.user_attrs.items()
            if records.tracked_as_metric(k, v)
        ]
        if metric_value(trial) is not None:
            summary.append(Metric("objective", metric_value(trial), now, 0))
        self.client.log_batch(run_id, metrics=summary, tags=tags)
        self.client.set_terminated(run_id, status=_MLFLOW_STATUS.get(state, "FAILED"))
        del self.runs[trial.number]  # only now: close() ends a run whose end failed half-way

    def study_finished(self, best: Any, status: str) -> None:
        if best is not None:
            self.client.log_metric(self.parent_run_id, f"best_dev_{self.cfg.metric}", metric_value(best))
            self.client.set_tag(self.parent_run_id, "llmflow.best_trial", str(best.number))
            self.client.log_dict(self.parent_run_id, dict(best.params), "study/best_params.json")
        self.client.set_terminated(self.parent_run_id, status=status)

    def close(self) -> None:
        for number, run_id in list(self.runs.items()):  # interrupted: the retry will be a new run
            with contextlib.suppress(Exception):
                self.client.set_tag(run_id, "llmflow.state", "INTERRUPTED")
                self.client.set_terminated(run_id, status="KILLED")
            self.runs.pop(number, None)


def _study_description(cfg: StudyConfig, study: Any) -> str:
    space = study.user_attrs.get(records.SEARCH_SPACE) or {}
    lines = [
        f"llmflow-hpo study **{cfg.study_name}**: {cfg.task}, model `{cfg.model.name_or_path}`, "
        f"dev {cfg.metric} ({cfg.direction}), {cfg.sampler.name} sampler, {cfg.pruner.name} pruner, "
        f"{cfg.n_trials} trials. Storage: `{cfg.storage}`.",
        "",
        "Searched: " + ", ".join(f"`{name}` {json.dumps(spec)}" for name, spec in space.items()),
        "",
        "Child runs are the trials: dev metrics by step (training examples seen).",
    ]
    return "\n".join(lines)


def track_retrain(cfg: StudyConfig, study: Any, result: Any, output: Path, *, train_on: str, log: Log) -> str | None:
    """``retrain-best``: a child run of the study's MLflow run with the retrained model as an artifact.

    Returns the run id, or None when the study does not track to MLflow or the tracking failed (reported).
    """
    if not cfg.tracking.mlflow:
        return None
    try:
        tracker = MlflowTracker(cfg, study)
        from mlflow.entities import Metric

        run = tracker.client.create_run(
            tracker.experiment_id,
            run_name=f"retrain-best (trial {result.trial_number})",
            tags={
                "mlflow.parentRunId": tracker.parent_run_id,
                "llmflow.study": cfg.study_name,
                "llmflow.trial": str(result.trial_number),
                "llmflow.kind": "retrain-best",
                "llmflow.train_on": train_on,
            },
        )
        run_id = run.info.run_id
        tracker._log_params(run_id, result.params)
        now = int(time.time() * 1000)
        metrics = [Metric(records.test(k), float(v), now, 0) for k, v in (result.test_metrics or {}).items()]
        metrics += [Metric(records.dev(k), float(v), now, 0) for k, v in (result.dev_metrics or {}).items()]
        if metrics:
            tracker.client.log_batch(run_id, metrics=metrics)
        tracker.client.log_artifacts(run_id, str(output), "model")
        tracker.client.set_terminated(run_id, status="FINISHED")
        log(f"tracking: mlflow run {run_id} (experiment {tracker.experiment_id}) holds the model, in {tracker.where}")
        return run_id
    except ImportError:
        log("tracking: mlflow is not installed (pip install 'llmflow-hpo[tracking]'); the model was not logged")
    except Exception as e:
        log(f"tracking: mlflow at {mlflow_uri(cfg, study)} failed ({_reason(e)}); the model was not logged")
    return None


# ----------------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, cfg: StudyConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.root = tensorboard_dir(cfg) / cfg.study_name
        self.where = str(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter
        self.writers: dict[int, Any] = {}

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        writer = self._writer(log_dir=str(self.root / f"trial-{number:04d}"))
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        writer.add_text("params", f"| parameter | value |\n|---|---|\n{table}", 0)
        self.writers[number] = writer

    def evaluation(self, number: int, step: int, metrics: dict[str, float], train_loss: float | None) -> None:
        writer = self.writers.get(number)
        if writer is None:
            return
        for key, value in metrics.items():
            writer.add_scalar(f"dev/{key}", float(value), step)
        if train_loss is not None:
            writer.add_scalar("train/loss", float(train_loss), step)
        writer.flush()

    def trial_finished(self, trial: Any) -> None:
        writer = self.writers.get(trial.number)
        if writer is None:
            return
        reason = trial.user_attrs.get(records.FAIL_REASON)
        text = trial.state.name + (f": {reason}" if reason else "")
        if metric_value(trial) is not None:
            text += f" (objective {metric_value(trial):.6g})"
        writer.add_text("state", text, 0)
        writer.close()
        del self.writers[trial.number]

    def close(self) -> None:
        for number in list(self.writers):
            writer = self.writers.pop(number)
            with contextlib.suppress(Exception):
                writer.add_text("state", "INTERRUPTED", 0)
                writer.close()
