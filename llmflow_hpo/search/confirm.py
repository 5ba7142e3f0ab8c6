"""The confirmation stage (``llmflow-hpo confirm``): the best search configurations re-run over several seeds.

A search trial's value is the best of its dev evaluations, and the study's best trial the best of its
trials: an optimistic estimate. ``run_confirmation`` takes the ``confirm.top`` best distinct configurations
of the complete search trials and trains each with ``confirm.seeds`` other training seeds (``seed+1`` ...
``seed+K``), as the search trains a trial (early stopping included; a seed's score is its best evaluation).
Each configuration is one trial of the same study, created RUNNING with the search trial's parameters and
tagged ``records.CONFIRMS``; seed i's score is its intermediate value at step i, so that optuna's
``WilcoxonPruner`` (``ConfirmationPruner``: compared with the best *confirmation* trial, not the study's best
search trial) drops a configuration that is clearly worse. Its value is the selection statistic (the mean, or
the pessimistic confidence bound ``lcb``); ``study.view.confirmed_winner`` picks the best.

A rerun continues: configurations already confirmed (complete, pruned, failed for good) are not run again,
an interrupted one resumes after its last finished seed. Each configuration's turn is decided when it comes
(``_todo``), so two confirm processes at once share the configurations: one another process is running is
skipped. Ctrl-C / SIGTERM record the running trial as FAIL (``interrupted``) with the seeds it finished.
Confirmation trials carry no heartbeat, so search workers never retry them; they hold no slot of ``n_trials`` and do not count in the search's rankings (``study.view``).
Torch is imported when a seed trains (``recipe.train``).
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmflow_hpo.config.study import StudyConfig
from llmflow_hpo.errors import ConfigError, StorageError, TrialFailure, interrupted_reason
from llmflow_hpo.search.reporting import BestSoFar, fail_on_error, record_failure
from llmflow_hpo.search.signals import Signals
from llmflow_hpo.search.spaces import SearchSpace, trial_params
from llmflow_hpo.study import records
from llmflow_hpo.study.optuna_private import create_trial, trial_id
from llmflow_hpo.study.view import (
    FINISHED_STATES,
    StudyView,
    config_key,
    confirmation_trials,
    confirmed_winner,
    params_text,
    ranked,
)

__all__ = [
    "ConfirmationPruner",
    "confirmation_seeds",
    "run_confirmation",
    "seed_stats",
    "top_configurations",
]

Log = Callable[[str], None]


def confirmation_seeds(cfg: StudyConfig) -> list[int]:
    """The training seeds of the confirmation: ``seed+1`` ... ``seed+K`` (K: ``confirm.seeds``). The search's
    own seed is left out: its score is the one the configuration was picked for, the optimistic one."""
    return [cfg.seed + i for i in range(1, cfg.confirm.seeds + 1)]


def seed_stats(scores: list[float], direction: str, confidence: float) -> dict[str, float | None]:
    """Mean, sample standard deviation and the one-sided confidence bound of the mean on the losing side
    (``mean - t(confidence, n-1) * sd / sqrt(n)`` when maximizing, ``+`` when minimizing); the std and the
    bound need two scores."""
    from scipy import stats

    n = len(scores)
    if n == 0:
        return {records.CONFIRM_MEAN: None, records.CONFIRM_STD: None, records.CONFIRM_LCB: None}
    mean = math.fsum(scores) / n
    if n < 2:
        return {records.CONFIRM_MEAN: mean, records.CONFIRM_STD: None, records.CONFIRM_LCB: None}
    std = math.sqrt(math.fsum((s - mean) ** 2 for s in scores) / (n - 1))
    half = float(stats.t.ppf(confidence, n - 1)) * std / math.sqrt(n)
    bound = mean - half if direction == "maximize" else mean + half
    return {records.CONFIRM_MEAN: mean, records.CONFIRM_STD: std, records.CONFIRM_LCB: bound}


def top_configurations(trials: list[FrozenTrial], direction: str, top: int) -> list[FrozenTrial]:
    """The best ``top`` complete search trials with distinct parameters, best first (``study.view.ranked``)."""
    seen: set[str] = set()
    picked: list[FrozenTrial] = []
    for t in ranked(trials, direction):
        key = config_key(t)
        if key not in seen:
            seen.add(key)
            picked.append(t)
        if len(picked) == top:
            break
    return picked


class _ConfirmationsOnly:
    """What ``WilcoxonPruner`` reads of a study (``direction``, ``best_trial``), restricted to the
    confirmation trials: the study's own ``best_trial`` is a search trial, whose steps are examples seen."""

    def __init__(self, direction: optuna.study.StudyDirection, best: FrozenTrial | None) -> None:
        self.direction = direction
        self._best = best

    @property
    def best_trial(self) -> FrozenTrial:
        if self._best is None:
            raise ValueError("no confirmation trial is complete yet")
        return self._best


class ConfirmationPruner(optuna.pruners.BasePruner):
    """optuna's ``WilcoxonPruner`` (step = seed: the same seeds pair up across configurations) against the
    best complete confirmation trial (the one asked about is running). Called by ``trial.should_prune()``
    after each seed; never prunes while no other configuration is confirmed, nor before two seeds pair up."""

    def __init__(self, p_threshold: float) -> None:
        with warnings.catch_warnings():  # experimental since optuna 3.6
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._wilcoxon = optuna.pruners.WilcoxonPruner(p_threshold=p_threshold)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        best = confirmed_winner(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), study.direction)
        return self._wilcoxon.prune(_ConfirmationsOnly(study.direction, best), trial)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# What the study holds already.


@dataclass
class _Todo:
    source: FrozenTrial  # the search trial whose configuration is confirmed
    resume: FrozenTrial | None  # an interrupted attempt whose finished seeds are taken over


def _alive(worker: Any) -> bool:
    """Whether the ``host:pid`` that runs a trial may still be running it (another host: assume it is)."""
    host, _, pid = str(worker).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_same_settings(done: list[FrozenTrial], seeds: list[int], cfg: StudyConfig, source: str) -> None:
    """A rerun continues the confirmation with its settings: mixing seeds or selection rules would compare
    configurations unfairly."""
    if not done:
        return
    attrs = done[0].user_attrs
    held = (attrs.get(records.CONFIRM_SEEDS), attrs.get(records.CONFIRM_SELECT), attrs.get(records.CONFIRM_CONFIDENCE))
    if held != (seeds, cfg.confirm.select, cfg.confirm.confidence):
        raise ConfigError(
            f"{source}: confirm: the study was confirmed with seeds {held[0]}, select {held[1]}, confidence "
            f"{held[2]} (now seeds {seeds}, select {cfg.confirm.select}, confidence {cfg.confirm.confidence}); "
            f"set confirm.seeds: {len(held[0] or [])}, confirm.select: {held[1]} and confirm.confidence: {held[2]} "
            "to continue it"
        )


def _todo(study: optuna.Study, trials: list[FrozenTrial], source: FrozenTrial, say: Log) -> _Todo | None:
    """Whether ``source``'s configuration still needs confirming, and which interrupted attempt it continues;
    asked just before it would run, as another confirm process may have taken it meanwhile. An attempt is
    the configuration's whichever search trial it confirmed (a configuration may be drawn twice)."""
    attempts = [t for t in confirmation_trials(trials) if config_key(t) == config_key(source)]
    if any(t.state in FINISHED_STATES or t.user_attrs.get(records.FAILED_FOR_GOOD) for t in attempts):
        return None
    running = [t for t in attempts if t.state == TrialState.RUNNING]
    if any(_alive(t.user_attrs.get(records.WORKER)) for t in running):
        say(f"confirm: configuration of trial {source.number} is being confirmed by another process; skipped")
        return None
    for t in running:  # its process died (SIGKILL): what it finished is kept, the attempt failed
        record = optuna.Trial(study, trial_id(t))
        record_failure(record, "its confirm process died", for_good=False)
        study.tell(record, state=TrialState.FAIL, skip_if_finished=True)
    resumable = [t for t in attempts if t.user_attrs.get(records.CONFIRM_SCORES)]
    return _Todo(source, max(resumable, key=lambda t: t.number) if resumable else None)


# ----------------------------------------------------------------------------------------------------
# Running one configuration.


def _train_seed(cfg: StudyConfig, params: dict[str, Any], features: Any, seed: int, say: Log, label: str) -> float:
    """One seed's run: the search's trial training (early stopping included); its score is its best dev
    evaluation. A non-finite metric or a run without evaluation is a ``TrialFailure``."""
    from llmflow_hpo.recipe.train import train_and_evaluate

    best = BestSoFar(cfg.metric, cfg.direction)

    def on_eval(evaluation: Any) -> None:
        value = best.add(evaluation)
        say(f"{label} step {evaluation.step}: dev {cfg.metric} {value:.4f}")

    result = train_and_evaluate(cfg, params, features, seed=seed, on_eval=on_eval)
    if best.best is None or result.best is None:
        raise TrialFailure(f"seed {seed}: the run ended before its first evaluation")
    return float(best.best.metrics[cfg.metric])


def _store_scores(trial: optuna.Trial, scores: list[float], cfg: StudyConfig) -> dict[str, float | None]:
    stats = seed_stats(scores, cfg.direction, cfg.confirm.confidence)
    trial.set_user_attr(records.CONFIRM_SCORES, list(scores))
    for key, value in stats.items():
        trial.set_user_attr(key, value)
    return stats


def _start_trial(study: optuna.Study, todo: _Todo, seeds: list[int], cfg: StudyConfig) -> tuple[optuna.Trial, list]:
    """The confirmation trial, created RUNNING with the source's parameters (not enqueued and asked: ``ask``
    takes the oldest WAITING trial, which may be a search retry); an interrupted attempt's scores reported."""
    from llmflow_hpo.recipe.runtime import runtime_attrs

    source = todo.source
    scores = list(todo.resume.user_attrs[records.CONFIRM_SCORES]) if todo.resume is not None else []
    attrs: dict[str, Any] = {
        **runtime_attrs(cfg, source.params),
        records.CONFIRMS: source.number,
        records.CONFIRM_SEEDS: seeds,
        records.CONFIRM_SELECT: cfg.confirm.select,
        records.CONFIRM_CONFIDENCE: cfg.confirm.confidence,
        records.WORKER: f"{socket.gethostname()}:{os.getpid()}",
        records.CONFIRM_SCORES: scores,
        **seed_stats(scores, cfg.direction, cfg.confirm.confidence),
    }
    if todo.resume is not None:
        attrs[records.RETRY_OF] = todo.resume.number
    frozen = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        params=source.params,
        distributions=source.distributions,
        user_attrs=attrs,
        intermediate_values=dict(enumerate(scores)),  # step i = seed i
    )
    _, new_id = create_trial(study, frozen)  # one write: a trial and all it starts with
    return optuna.Trial(study, new_id), scores


def _confirm_one(
    study: optuna.Study, todo: _Todo, seeds: list[int], cfg: StudyConfig, space: SearchSpace, features: Any, say: Log
) -> None:
    """Train the configuration's remaining seeds, report each, and tell the trial's end."""
    params = trial_params(todo.source, space)
    trial, scores = _start_trial(study, todo, seeds, cfg)
    head = f"confirm: trial {trial.number} (configuration of trial {todo.source.number}: {params_text(params)})"
    say(head + (f", resuming after {len(scores)} seed(s) of trial {todo.resume.number}" if todo.resume else ""))
    state = TrialState.COMPLETE
    try:
        for step in range(len(scores), len(seeds)):
            label = f"confirm: trial {trial.number} seed {seeds[step]} ({step + 1}/{len(seeds)})"
            scores.append(_train_seed(cfg, params, features, seeds[step], say, label))
            trial.report(scores[-1], step)
            stats = _store_scores(trial, scores, cfg)
            std = stats[records.CONFIRM_STD]
            say(
                f"{label}: dev {cfg.metric}={scores[-1]:.4f}; mean {stats[records.CONFIRM_MEAN]:.4f}"
                + (f" +- {std:.4f}" if std is not None else "")
                + f" over {len(scores)} seed(s)"
            )
            if step + 1 < len(seeds) and trial.should_prune():
                trial.set_user_attr(records.PRUNED_AT_STEP, step)
                say(f"confirm: trial {trial.number} pruned after {len(scores)} seeds (Wilcoxon: clearly worse)")
                state = TrialState.PRUNED
                break
    except TrialFailure as e:
        record_failure(trial, str(e), for_good=True)
        study.tell(trial, state=TrialState.FAIL)
        say(f"confirm: trial {trial.number} failed: {e}")
        return
    except KeyboardInterrupt as e:
        record_failure(trial, interrupted_reason(e), for_good=False)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    except BaseException as e:
        fail_on_error(study, trial, e)
        raise
    stats = seed_stats(scores, cfg.direction, cfg.confirm.confidence)
    value = stats[records.CONFIRM_MEAN] if cfg.confirm.select == "mean" else stats[records.CONFIRM_LCB]
    with Signals.critical():  # a signal now waits until the result is stored
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)


# ----------------------------------------------------------------------------------------------------
# The stage.


def open_confirmation_study(cfg: StudyConfig, space_raw: dict[str, Any], source: str) -> optuna.Study:
    """The stored study of ``cfg`` (it must exist and be the same study), with the confirmation's pruner. A
    quality-against-cost study is refused before the storage is opened: a confirmation trial carries one value."""
    from llmflow_hpo.study.provenance import check_same_study
    from llmflow_hpo.study.storage import open_storage, require_study

    if cfg.objective.cost is not None:
        raise ConfigError(
            f"{source}: objective.cost: confirm re-runs single-objective studies only; "
            "a quality-against-cost study's pick is retrain-best's (objective.select)"
        )
    assert cfg.storage is not None
    storage = open_storage(cfg.storage, existing=True)
    require_study(storage, cfg.study_name, cfg.storage)
    pruner = ConfirmationPruner(cfg.confirm.p_threshold) if cfg.confirm.prune else optuna.pruners.NopPruner()
    study = optuna.load_study(
        study_name=cfg.study_name, storage=storage, pruner=pruner, sampler=optuna.samplers.RandomSampler(cfg.seed)
    )
    stored = [d.name.lower() for d in study.directions]  # a stored quality-against-cost study has two
    if stored != cfg.directions:
        raise StorageError(
            f"{source}: study {cfg.study_name!r} in {cfg.storage} has direction {', '.join(stored)}; the config "
            f"says {cfg.direction} dev {cfg.metric} (objective.direction, objective.cost)"
        )
    check_same_study(study, cfg, space_raw)
    return study


def run_confirmation(
    cfg: StudyConfig,
    space: SearchSpace,
    space_raw: dict[str, Any],
    *,
    source: str,
    log: Log,
    data: Any = None,
) -> dict[str, Any]:
    """Confirm the study's top ``cfg.confirm.top`` configurations over ``cfg.confirm.seeds`` seeds; returns
    ``study.view.confirmation_summary`` of the study afterwards, with ``ran`` (configurations run here)."""
    from llmflow_hpo.search.driver import open_features
    from llmflow_hpo.study.view import confirmation_summary

    study = open_confirmation_study(cfg, space_raw, source)
    trials = study.get_trials(deepcopy=False)
    sources = top_configurations(trials, cfg.direction, cfg.confirm.top)
    if not sources:
        raise StorageError(
            f"study {cfg.study_name!r} has no complete search trial to confirm; run `llmflow-hpo search` first"
        )
    seeds = confirmation_seeds(cfg)
    _check_same_settings(confirmation_trials(trials), seeds, cfg, source)
    log(
        f"confirm: study {cfg.study_name}: top {len(sources)} configuration(s) (trials "
        f"{', '.join(str(t.number) for t in sources)}) x {len(seeds)} seeds {seeds}, selected by {cfg.confirm.select}"
    )
    ran, features = 0, None
    with Signals.installed():
        for config in sources:
            todo = _todo(study, trials, config, log)
            if todo is None:
                continue
            if features is None:  # tokenized once, when the first configuration runs
                features = open_features(cfg, log, data)
            _confirm_one(study, todo, seeds, cfg, space, features, log)
            ran += 1
            trials = study.get_trials(deepcopy=False)  # what other confirm processes did meanwhile
    if not ran:
        log("confirm: every configuration is confirmed already (or another process confirms it); nothing to run")
    summary = confirmation_summary(StudyView.of(study))
    if summary is not None and ran:
        from llmflow_hpo.study.note import write_confirmation_note

        write_confirmation_note(study, summary, cfg.metric)  # the dashboard's Note panel shows the table
    return {
        **(summary or {}),
        "ran": ran,
        "study": cfg.study_name,
        "storage": str(cfg.storage),
        "metric": cfg.metric,
    }
