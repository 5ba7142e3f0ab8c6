"""The Ray backend's part of ``driver.run_search``: the study's trials run as Ray Tune runs in ``ray.dir``.

A run is ``ray.dir/<study>-run<K>``. A search that finds the last run interrupted (study trials of that run
still RUNNING) restores it with ``Tuner.restore``: running trials continue from their last checkpoint.
Otherwise it starts run K+1 for the trials still missing. Each run's Tuner: the study's sampler through
``StudySearch`` (PBT: Ray's random variants over the same distributions), the configured scheduler, and
the ``StudyRecorder`` callback that writes the study.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import Interrupted
from llmflow_hpo.search.backends.ray_backend.recorder import DRIVER, StudyRecorder, StudySearch, drop_checkpoints
from llmflow_hpo.search.backends.ray_backend.schedulers import build_scheduler, metric_key, tune_domain
from llmflow_hpo.search.backends.ray_backend.session import gpus_per_trial, ray_session, sigterm_as_sigint
from llmflow_hpo.search.backends.ray_backend.trainable import ray_trial
from llmflow_hpo.search.driver import SearchRun
from llmflow_hpo.search.reporting import fail_lost_trial
from llmflow_hpo.search.spaces import SearchSpace
from llmflow_hpo.study import records
from llmflow_hpo.study.optuna_private import storage_of
from llmflow_hpo.study.storage import finished_trials

__all__ = ["RayTrials"]


def _run_path(cfg: StudyConfig, run: str) -> str:
    assert cfg.ray.dir is not None
    return f"{cfg.ray.dir.rstrip('/')}/{run}"


def _runs(cfg: StudyConfig) -> list[str]:
    """The study's earlier Ray runs in ``ray.dir``, oldest first."""
    found = []
    k = 1
    while tune.Tuner.can_restore(_run_path(cfg, f"{cfg.study_name}-run{k}")):
        found.append(f"{cfg.study_name}-run{k}")
        k += 1
    return found


def _ray_running(study: optuna.Study, run: str | None = None) -> list[Any]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get(records.BACKEND) == "ray" and (run is None or t.user_attrs.get(records.RAY_RUN) == run)
    ]


def _in_memory(features: Any) -> Any:
    """The tokenized splits as in-memory tables, so Ray ships them to every node (no path to the cache).

    Each keeps its fingerprint (``datasets`` offers no public reader of it; this is the one place it is read).
    """
    import datasets

    splits = {
        name: datasets.Dataset(datasets.table.InMemoryTable(ds.data.table), fingerprint=ds._fingerprint)
        for name, ds in features.splits.items()
    }
    return dataclasses.replace(features, splits=splits)


def _new_tuner(run: SearchRun, trainable: Any, *, name: str, samples: int) -> Any:
    """A Tuner for a new run of ``samples`` trials: the study's sampler through StudySearch (PBT: Ray's
    random variants), the configured scheduler, and the StudyRecorder callback."""
    cfg, space = run.cfg, run.space
    key, mode = metric_key(cfg), "max" if cfg.direction == "maximize" else "min"
    assert cfg.storage is not None and run.target is not None
    recorder = StudyRecorder(
        storage=cfg.storage,
        study_name=cfg.study_name,
        space=space,
        key=key,
        metric=cfg.metric,
        run=name,
        scheduler=cfg.ray.scheduler,
        target=run.target,
        direction=cfg.direction,
    )
    if cfg.ray.scheduler == "pbt":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg: Any = BasicVariantGenerator(random_state=cfg.seed)
        param_space = {n: tune_domain(dist) for n, dist in space.items()}
    else:
        search_alg = StudySearch(
            run=name,
            space=dict(space),
            metric=key,
            mode=mode,
            sampler=run.sampler,
            study_name=cfg.study_name,
            storage=storage_of(run.study),
            budget=run.budget,
        )
        param_space = {}
    n_train = len(run.features.splits["train"])
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=key,
            mode=mode,
            search_alg=search_alg,
            scheduler=build_scheduler(cfg, space, n_train, run.source),
            num_samples=samples,
            max_concurrent_trials=cfg.ray.max_concurrent_trials,
            # Ray's time budget kills the running trials (they end FAIL, lost): the search's budget is kept by
            # StudySearch (no trial starts that does not fit) and the trainable (stops at an evaluation) instead.
            time_budget_s=cfg.timeout,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=cfg.ray.dir,
            failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
            # PBT clones a trial's checkpoint some time after choosing it: keep them all until the run
            # ends (then they are deleted); otherwise the latest is all a trial resumes from.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if cfg.ray.scheduler == "pbt" else 1),
            callbacks=[recorder],
            verbose=0,
        ),
    )


def _fit(tuner: Any, cfg: StudyConfig, study: optuna.Study, run: str) -> tuple[set[str], int | None]:
    """Run ``tuner``; returns the Ray trials left unfinished and the signal that interrupted the run."""
    import signal

    with sigterm_as_sigint() as got:
        tuner.fit()
    # Ray's saved state says what a restore would continue: trials not yet TERMINATED or ERROR mean the
    # run was interrupted (Ray stops them when it gets SIGINT, after saving its state).
    saved = tune.ExperimentAnalysis(_run_path(cfg, run)).trials
    unfinished = {t.trial_id for t in saved if t.status not in ("TERMINATED", "ERROR")}
    if not unfinished:
        for trial in saved:  # PBT's checkpoints, kept until the end (StudyRecorder drops the others)
            drop_checkpoints(trial)
    for t in _ray_running(study, run):
        if t.user_attrs.get(records.RAY_TRIAL_ID) not in unfinished:  # asked, but Ray's saved state never had it
            fail_lost_trial(study, t, "lost: its Ray run ended without it")
    return unfinished, (got.get("signum", signal.SIGINT) if unfinished else None)


class RayTrials:
    """How trials run under Ray Tune (``driver.TrialRunner``): Ray runs in ``ray.dir``, an interrupted one
    restored first, each trial recorded into the study by ``StudyRecorder`` as Ray reports it."""

    workers = 1  # Ray runs the trials; the summary counts this driver
    heartbeat = False  # Ray's trials record no heartbeat: Ray restarts a failed trial itself

    def __init__(self) -> None:
        self._runs: list[str] = []
        self._resume: str | None = None

    def check(self, cfg: StudyConfig, space: SearchSpace, n_train: int, source: str) -> None:
        assert cfg.n_trials is not None
        build_scheduler(cfg, space, n_train, source)  # bad scheduler options: refused before Ray starts

    def unfinished(self, cfg: StudyConfig, study: optuna.Study) -> bool:
        self._runs = _runs(cfg)
        self._resume = self._runs[-1] if self._runs and _ray_running(study, self._runs[-1]) else None
        return self._resume is not None

    def announce(self, cfg: StudyConfig, remaining: int | None) -> str | None:
        return None  # each Ray run is announced as it starts (_start)

    def run(self, run: SearchRun) -> None:
        cfg = run.cfg
        DRIVER[cfg.study_name] = (run.progress, run.tracking)
        try:
            with ray_session(cfg, run.say) as ray:
                gpus = gpus_per_trial(cfg, ray)
                every_eval = cfg.ray.scheduler in ("pbt", "hyperband")
                trainable = tune.with_resources(
                    tune.with_parameters(
                        ray_trial,
                        cfg=cfg,
                        space=run.space,
                        features=_in_memory(run.features),
                        every_eval=every_eval,
                        budget=run.budget,
                    ),
                    {"cpu": cfg.ray.cpus_per_trial, "gpu": gpus},
                )
                self._fit_runs(run, trainable, gpus)
        finally:
            DRIVER.pop(cfg.study_name, None)

    def _fit_runs(self, run: SearchRun, trainable: Any, gpus: float) -> None:
        """The interrupted run first (when there is one), then a new run for the trials still missing.

        A restored run ran only the trials it had; a new run fills what is still missing (n_trials may have
        grown since). A new run is not repeated: what failed in it stays failed, as in the optuna backend.
        """
        assert run.target is not None and run.remaining is not None
        remaining = run.remaining
        while True:
            name, tuner = (
                self._restore(run, trainable) if self._resume else self._start(run, trainable, gpus, remaining)
            )
            unfinished, interrupted = _fit(tuner, run.cfg, run.study, name)
            if interrupted is not None:
                run.say(run.took())
                run.say(
                    f"study {run.cfg.study_name}: Ray run {name} interrupted with {len(unfinished)} unfinished "
                    "trial(s), its state saved; rerun the same command to continue it"
                )
                raise Interrupted(interrupted)
            remaining = max(run.target - finished_trials(run.study), 0)
            if self._resume is None or remaining == 0:
                return
            self._resume = None

    def _restore(self, run: SearchRun, trainable: Any) -> tuple[str, Any]:
        name = self._resume
        assert name is not None
        run.say(
            f"study {run.cfg.study_name}: continuing the interrupted Ray run {name} "
            f"({len(_ray_running(run.study, name))} trial(s) were running)"
        )
        return name, tune.Tuner.restore(
            _run_path(run.cfg, name), trainable, resume_unfinished=True, resume_errored=False
        )

    def _start(self, run: SearchRun, trainable: Any, gpus: float, remaining: int) -> tuple[str, Any]:
        cfg = run.cfg
        name = f"{cfg.study_name}-run{len(self._runs) + 1}"
        self._runs.append(name)
        run.say(
            f"study {cfg.study_name}: Ray run {name}: {remaining} trial(s), {cfg.ray.scheduler} scheduler, "
            f"{cfg.ray.cpus_per_trial:g} CPU and {gpus:g} GPU per trial, "
            f"at most {cfg.ray.max_concurrent_trials or 'as many as fit'} at once, storage {cfg.storage}"
        )
        return name, _new_tuner(run, trainable, name=name, samples=remaining)
