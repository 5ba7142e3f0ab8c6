"""The training recipe. Reads top to bottom: set up, the training step, the evaluation point, the loop,
and the two entry points that share them.

- ``train_and_evaluate`` runs a search trial: it evaluates dev at the evaluation points, reports each
  evaluation (the report may prune it), stops early after ``early_stopping_patience`` evaluations
  without improvement, keeps the best evaluation (not the last) and checkpoints the loop.
- ``retrain`` runs ``retrain-best``: it trains without evaluating until a number of examples was seen,
  then evaluates dev (and test) and hands the model back.

Reproducibility: a retrain with the same seed that skips the evaluations reaches the same weights at
the same step (see ``batches``: the training order and the evaluations own their generators).

Resuming: with a ``checkpoint``, the loop saves its whole state after dev evaluations (model, optimizer,
scheduler, the RNG states, the generator state at the start of the epoch and how far into the epoch it
was; see ``checkpoints.LoopState``). A run given a saved state continues from it and takes the same
batches and dropout masks an uninterrupted run would have taken.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmflow_hpo.config.study import StudyConfig, TrainConfig, clip_norm
from llmflow_hpo.data.features import Features
from llmflow_hpo.errors import TrialFailure
from llmflow_hpo.recipe.adapters import kept_weights, trainable_count, with_adapter
from llmflow_hpo.recipe.batches import eval_loader, train_loader
from llmflow_hpo.recipe.checkpoints import LoopState, TrialCheckpoint, checkpoint_state, restore_state
from llmflow_hpo.recipe.evaluation import LATENCY_EXAMPLES, evaluate, latency_ms, weights_digest
from llmflow_hpo.recipe.loss import balanced_class_weights, loss_fn
from llmflow_hpo.recipe.models import build_model, load_tokenizer
from llmflow_hpo.recipe.optim import adopt_hyperparameters, build_optimizer, build_scheduler
from llmflow_hpo.recipe.results import Evaluation, OnCosts, OnEval, OnResume, OnStep, TrainResult, better
from llmflow_hpo.recipe.runtime import Runtime, device_settings, peak_memory, resolve_runtime, runtime_attrs
from llmflow_hpo.study import records
from llmflow_hpo.tasks import BaseTask, get_task

__all__ = ["retrain", "train_and_evaluate"]


# ----------------------------------------------------------------------------------------------------
# Set-up: seed, tokenizer, model, loaders, optimizer, scheduler, loss weights, on the run's runtime.


@dataclass
class _Run:
    """Everything one run trains with, built by ``_set_up``; ``release`` drops the heavy part."""

    cfg: StudyConfig
    hp: TrainConfig
    task: BaseTask
    features: Features
    runtime: Runtime
    model: Any
    tokenizer: Any
    collate: Any
    train_loader: Any
    dev_loader: Any
    optimizer: Any
    scheduler: Any
    scaler: Any  # fp16's GradScaler, else None
    max_norm: float | None  # gradient clipping, None for none
    class_weights: torch.Tensor | None
    n_train: int

    def release(self) -> None:
        """Drop the model, loaders and optimizer: a traceback that outlives the run keeps only this shell."""
        self.model = self.tokenizer = self.collate = self.train_loader = self.dev_loader = None
        self.optimizer = self.scheduler = self.scaler = self.class_weights = None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _set_up(cfg: StudyConfig, hp: TrainConfig, features: Features, runtime: Runtime, seed: int, split: str) -> _Run:
    _seed_everything(seed)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(
        cfg.model,
        task=cfg.task,
        labels=features.labels,
        hidden_dropout=hp.hidden_dropout,
        attention_dropout=hp.attention_dropout,
        num_layers=hp.num_layers,
        quantization=hp.quantization,
        device=runtime.device,
    )
    if hp.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = with_adapter(model, hp, cfg.task)
    model.train()
    task = get_task(cfg.task)
    collate = task.collator(tokenizer, cfg.data)
    train_ds = features.splits[split]
    loader = train_loader(train_ds, hp, runtime, collate, seed)
    dev_loader = eval_loader(features.splits["dev"], hp, runtime, collate)
    optimizer = build_optimizer(model, hp, runtime)
    scheduler = build_scheduler(optimizer, hp, total_steps=hp.epochs * math.ceil(len(train_ds) / hp.batch_size))
    weights = None
    if hp.class_weighting == "balanced":
        weights = balanced_class_weights(features, train_ds["labels"], runtime.device)
    return _Run(
        cfg=cfg,
        hp=hp,
        task=task,
        features=features,
        runtime=runtime,
        model=model,
        tokenizer=tokenizer,
        collate=collate,
        train_loader=loader,
        dev_loader=dev_loader,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(runtime.device.type) if runtime.precision == "fp16" else None,
        max_norm=clip_norm(hp.max_grad_norm),
        class_weights=weights,
        n_train=len(train_ds),
    )


@contextmanager
def _running(cfg: StudyConfig, hp: TrainConfig, features: Features, seed: int, split: str) -> Iterator[_Run]:
    """A set-up run on its device settings; afterwards nothing of it stays (and out of memory is a failure)."""
    runtime = resolve_runtime(hp)
    run: _Run | None = None
    with device_settings(hp, runtime):
        try:
            run = _set_up(cfg, hp, features, runtime, seed, split)
            yield run
        except torch.OutOfMemoryError as e:
            raise TrialFailure(
                f"out of memory on {runtime.device}: {str(e).splitlines()[0]} (batch_size={hp.batch_size})"
            ) from None
        finally:
            if run is not None:
                run.release()


def _resume(
    run: _Run, checkpoint: TrialCheckpoint | None, params: dict[str, Any], on_resume: OnResume | None
) -> LoopState:
    """The loop state to start from: the checkpoint's, loaded into the run, or a fresh one."""
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is None:
        return LoopState()
    loop = restore_state(
        saved,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        scaler=run.scaler,
        device=run.runtime.device,
    )
    if saved.get("params") != params:  # PBT: another trial's state, continued with mutated parameters
        adopt_hyperparameters(run.optimizer, run.scheduler, run.hp)
    run.train_loader.sampler.skip = loop.examples_in_epoch
    if on_resume is not None:
        on_resume(loop.history)
    return loop


def _costs(run: _Run) -> dict[str, float]:
    """What the run's model costs (``OnCosts``): its parameter count, and in a study whose cost is latency its
    inference latency on the first ``LATENCY_EXAMPLES`` dev examples, one at a time (``latency_ms``). It draws
    from no RNG the training uses (eval mode, the eval loader's own generator): a retrain that skips it reaches
    the same weights."""
    costs: dict[str, float] = {
        records.N_PARAMS: sum(p.numel() for p in run.model.parameters()),
        records.N_TRAINABLE: trainable_count(run.model),
    }
    if run.cfg.objective.cost == "latency_ms":
        dev = run.features.splits["dev"]
        one = dataclasses.replace(run.hp, eval_batch_size=1)
        loader = eval_loader(dev.select(range(min(LATENCY_EXAMPLES, len(dev)))), one, run.runtime, run.collate)
        costs[records.LATENCY_MS] = round(latency_ms(run.model, loader, run.runtime), 4)
    return costs


# ----------------------------------------------------------------------------------------------------
# The training step and the loop.


def _train_step(run: _Run, batch: dict[str, torch.Tensor], step_number: int) -> tuple[float, int]:
    """One optimizer step on one batch: its training loss and the number of examples in it."""
    hp, runtime, model, optimizer, scaler = run.hp, run.runtime, run.model, run.optimizer, run.scaler
    task = run.task
    examples = task.batch_examples(batch)
    batch = {k: v.to(runtime.device, non_blocking=runtime.pin_memory) for k, v in batch.items()}
    labels = batch.pop("labels")
    with runtime.autocast():
        logits = model(**batch).logits
    loss = loss_fn(*task.loss_inputs(logits, labels), hp, run.class_weights)
    value = float(loss.detach())  # the step's one wait for the device: read once, before backward
    if not math.isfinite(value):
        raise TrialFailure(
            f"diverged: non-finite training loss ({value}) at optimizer step {step_number} "
            f"(learning_rate={hp.learning_rate:g})"
        )
    max_norm = run.max_norm
    if scaler is None:
        loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
    else:  # fp16: scaled gradients, unscaled before clipping; a step with inf/nan gradients is skipped
        scaler.scale(loss).backward()
        if max_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(optimizer)
        scaler.update()
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return value, examples


def _train(run: _Run, loop: LoopState, points: list[int], on_step: OnStep | None) -> Iterator[int]:
    """Train epoch by epoch; yield at each evaluation point crossed (the caller evaluates, or stops).

    One yield per optimizer step, at the last point the step crossed (a batch larger than the interval
    between points crosses several). A resumed loop replays its epoch's draws and skips what it had seen.
    """
    generator, first = run.train_loader.generator, loop.epoch
    run_examples = points[-1] if points else 0
    for epoch in range(first, run.hp.epochs):
        tick = time.perf_counter()
        loop.epoch = epoch
        if epoch == first and loop.epoch_start_state is not None:  # resuming: replay this epoch's draws
            generator.set_state(loop.epoch_start_state)
        else:
            loop.examples_in_epoch = 0
            loop.epoch_start_state = generator.get_state()
        for batch in run.train_loader:
            loss, examples = _train_step(run, batch, loop.optimizer_step + 1)
            loop.optimizer_step += 1
            loop.examples_seen += examples
            loop.examples_in_epoch += examples
            loop.running_loss += loss
            loop.running_count += 1
            if on_step is not None:
                on_step(loop.examples_seen, run_examples, loop.running_loss / loop.running_count)
            if loop.next_point < len(points) and loop.examples_seen >= points[loop.next_point]:
                loop.train_seconds += time.perf_counter() - tick
                while loop.next_point < len(points) and loop.examples_seen >= points[loop.next_point]:
                    loop.next_point += 1
                yield points[loop.next_point - 1]
                tick = time.perf_counter()
        loop.train_seconds += time.perf_counter() - tick


# ----------------------------------------------------------------------------------------------------
# The evaluation point: evaluate, keep the best, early stopping, checkpoint, report.


def _evaluate_dev(run: _Run, loop: LoopState, step: int) -> Evaluation:
    tick = time.perf_counter()
    metrics, samples = evaluate(
        run.model, run.dev_loader, run.features, "dev", run.runtime, tokenizer=run.tokenizer, cfg=run.cfg
    )
    evaluation = Evaluation(
        step=step,
        examples_seen=loop.examples_seen,
        optimizer_step=loop.optimizer_step,
        epoch=loop.examples_seen / run.n_train,
        metrics=metrics,
        train_loss=loop.running_loss / max(loop.running_count, 1),
        samples=samples,
    )
    loop.eval_seconds += time.perf_counter() - tick
    return evaluation


def _evaluation_point(
    run: _Run,
    loop: LoopState,
    step: int,
    points: list[int],
    checkpoint: TrialCheckpoint | None,
    on_eval: OnEval | None,
) -> bool:
    """Evaluate dev at ``step`` and decide what follows it; True when the run stops early here."""
    metric, direction, hp = run.cfg.metric, run.cfg.direction, run.hp
    evaluation = _evaluate_dev(run, loop, step)
    loop.running_loss, loop.running_count = 0.0, 0
    loop.history.append(evaluation)
    value, best_value = evaluation.metrics[metric], loop.best and loop.best.metrics[metric]
    # Patience counts evaluations that do not beat the best by min delta; the best is the best.
    patient = better(value, best_value, direction, hp.early_stopping_min_delta)
    loop.since_best = 0 if patient else loop.since_best + 1
    if better(value, best_value, direction):
        loop.best = evaluation
        # the CPU copy the checkpoint keeps is hashed, rather than copying the weights off the device twice
        kept = checkpoint.remember_best(run.model) if checkpoint is not None else None
        evaluation.weights_sha256 = weights_digest(kept or kept_weights(run.model))
    stop = hp.early_stopping_patience is not None and loop.since_best >= hp.early_stopping_patience
    more = loop.next_point < len(points)
    evaluation.last = stop or not more
    # The checkpoint comes before the report, so a report can hand it over (Ray Tune's tune.report takes
    # the checkpoint with the metrics); a trial the report prunes may have written one for nothing, within
    # checkpoint.max_overhead.
    if checkpoint is not None and not stop and more and checkpoint.due():
        checkpoint.save(
            checkpoint_state(
                model=run.model,
                optimizer=run.optimizer,
                scheduler=run.scheduler,
                scaler=run.scaler,
                loop=loop,
                device=run.runtime.device,
            )
        )
    loop.stopped_early = stop  # by early stopping; a run on_eval ends (a budget spent) did not stop early
    if on_eval is not None and on_eval(evaluation):  # may raise optuna.TrialPruned; True: stop here
        return True
    return stop


def _result(run: _Run, loop: LoopState, params: dict[str, Any], setup_seconds: float) -> TrainResult:
    return TrainResult(
        best=loop.best,
        history=loop.history,
        stopped_early=loop.stopped_early,
        train_time_s=time.perf_counter() - loop.started,
        examples_per_second=loop.examples_seen / max(loop.train_seconds, 1e-9),
        n_params=sum(p.numel() for p in run.model.parameters()),
        n_trainable=trainable_count(run.model),
        peak_memory_mb=0.0,
        peak_memory_kind="",
        device=str(run.runtime.device),
        torch_threads=torch.get_num_threads(),
        setup_seconds=setup_seconds,
        train_seconds=loop.train_seconds,
        eval_seconds=loop.eval_seconds,
        runtime=runtime_attrs(run.cfg, params, run.runtime),
    )


# ----------------------------------------------------------------------------------------------------
# The entry points.


def train_and_evaluate(
    cfg: StudyConfig,
    params: dict[str, Any],
    features: Features,
    *,
    seed: int,
    checkpoint: TrialCheckpoint | None = None,
    on_eval: OnEval | None = None,
    on_resume: OnResume | None = None,
    on_step: OnStep | None = None,
    keep_model: bool = False,
    on_costs: OnCosts | None = None,
) -> TrainResult:
    """A search trial: train with ``params`` (searched values over cfg.train's fixed ones), evaluate dev.

    It evaluates ``evals_per_epoch`` times an epoch, calls ``on_eval`` after each evaluation (it may raise
    optuna.TrialPruned, or return True to end the run there: the search's budget is spent) and stops early
    after ``early_stopping_patience`` evaluations without improvement.
    ``checkpoint``: resume from its saved state when it has one (``on_resume`` then receives the evaluations
    that state had made), save the state after evaluations that do not end the run when it says one is due,
    and keep the best model (written with the next checkpoint, or when the run completes). ``on_step`` is
    called after every optimizer step (progress displays); ``keep_model`` hands the trained model back;
    ``on_costs`` receives what the model costs (``_costs``) before the first batch.
    """
    entered = time.perf_counter()
    hp = cfg.train.with_params(params)  # the searched values over the fixed ones (config/hyperparameters.py)
    with _running(cfg, hp, features, seed, "train") as run:
        setup_seconds = time.perf_counter() - entered
        loop = _resume(run, checkpoint, params, on_resume)
        if on_costs is not None:
            on_costs(_costs(run))
        points = hp.evaluation_points(run.n_train)
        for step in _train(run, loop, points, on_step):
            if _evaluation_point(run, loop, step, points, checkpoint, on_eval):
                break
        result = _result(run, loop, params, setup_seconds)
        if checkpoint is not None:
            checkpoint.finish()
            result.checkpoints_written, result.checkpoint_seconds = checkpoint.written, checkpoint.seconds
        result.peak_memory_mb, result.peak_memory_kind = peak_memory(run.runtime.device)
        if keep_model:
            result.model = run.model.cpu()
        return result


def retrain(
    cfg: StudyConfig,
    params: dict[str, Any],
    features: Features,
    *,
    seed: int,
    stop_at_examples: int,
    train_split: str = "train",
    evaluate_test: bool = False,
) -> TrainResult:
    """retrain-best: train on ``train_split`` without evaluating until ``stop_at_examples`` examples were
    seen, then evaluate dev (``result.final``) and, with ``evaluate_test``, test; the model is handed back.

    With the trial's seed and split this reaches the trial's weights at that step: the same batches and
    dropout masks, since its evaluations drew from no RNG the training uses.
    """
    entered = time.perf_counter()
    hp = cfg.train.with_params(params)  # the searched values over the fixed ones (config/hyperparameters.py)
    with _running(cfg, hp, features, seed, train_split) as run:
        setup_seconds = time.perf_counter() - entered
        loop = LoopState()
        next(_train(run, loop, [stop_at_examples], on_step=None), None)  # up to the point (or the last epoch's end)
        result = _result(run, loop, params, setup_seconds)
        result.final = _evaluate_dev(run, loop, stop_at_examples)
        if evaluate_test:
            test_loader = eval_loader(features.splits["test"], hp, run.runtime, run.collate)
            result.test_metrics, result.test_samples = evaluate(
                run.model, test_loader, features, "test", run.runtime, tokenizer=run.tokenizer, cfg=cfg
            )
        result.peak_memory_mb, result.peak_memory_kind = peak_memory(run.runtime.device)
        result.model = run.model.cpu()
        return result
