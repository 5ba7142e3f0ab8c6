"""A study in optuna-dashboard: the note that says what the study searched, and ``llmflow-hpo dashboard``.

optuna-dashboard (a dependency) shows a study's trials, learning curves and plots from the storage alone.
``study_note`` is the Markdown a study carries as its dashboard note (written by ``storage.open_study``):
the task, model, data, objective, sampler and pruner, search space, the unit of the curves and what each
user attribute holds. ``open_dashboard`` serves optuna-dashboard's WSGI app on a local port; ``serve``
runs it until Ctrl-C or SIGTERM. Neither imports torch or transformers.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import signal
import socket
import socketserver
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import optuna

from llmflow_hpo import __version__
from llmflow_hpo.config.study import StudyConfig, config_to_dict
from llmflow_hpo.errors import LlmflowError, StorageError

__all__ = ["Dashboard", "only_storage_here", "open_dashboard", "study_note", "write_study_note"]


# ---------------------------------------------------------------------------------------- the note

# The user attributes a trial may carry (reporting.store_result, objective, the backends), as the note explains them.
TRIAL_ATTRS = (
    ("dev_*", "every dev metric of the trial's best evaluation (`dev_{metric}` is the trial's value)"),
    (
        "best_step, best_optimizer_step, best_epoch",
        "when that best evaluation happened (examples seen, optimizer steps, epochs)",
    ),
    ("best_weights_sha256", "SHA-256 of the weights at that evaluation (retrain-best compares its model's)"),
    ("evaluations, stopped_early", "dev evaluations run; whether early stopping ended the trial"),
    (
        "train_time_s, setup_s, train_s, eval_s",
        "seconds: the whole run; set-up before the first batch; training steps; dev evaluations",
    ),
    ("examples_per_second, n_params", "training throughput; the model's parameter count"),
    (
        "peak_memory_mb, peak_memory_kind",
        "peak memory of the run and what was measured (CUDA max allocated or process max RSS)",
    ),
    ("device, precision, tf32, fused_optimizer, pin_memory, group_by_length, torch_threads", "how the trial ran"),
    ("seed, worker", "the training seed; host:pid of the worker that ran the trial"),
    ("pruned_at_step", "pruned trials: the step the pruner stopped them at"),
    ("fail_reason, failed_for_good", "failed trials: why; whether a retry is pointless"),
    ("retry_of, resumed_at_step", "retries of a dead or interrupted trial: its number; the step it resumed from"),
    (
        "checkpoint_trial, checkpoints_written, checkpoint_s",
        "checkpointing: whose folder, how many written, seconds spent",
    ),
)
RAY_TRIAL_ATTRS = (
    (
        "ray_trial_id, ray_run, ray_failures, stopped_by, pbt_schedule",
        "backend ray: Ray Tune's trial id and run, its failures, the scheduler that stopped it, PBT's changes",
    ),
)


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string: show the number
        try:
            return f"{float(value):g}"
        except ValueError:
            return value
    return json.dumps(value)


def _space_rows(space_raw: dict[str, Any]) -> list[str]:
    rows = ["| parameter | type | range or choices | scale |", "|---|---|---|---|"]
    for name, spec in space_raw.items():
        kind = spec.get("type")
        if kind == "categorical":
            values, scale = ", ".join(_num(c) if c is not None else "null" for c in spec["choices"]), "-"
        else:
            values = f"{_num(spec['low'])} to {_num(spec['high'])}"
            scale = "log" if spec.get("log") else "linear"
            if spec.get("step") is not None:
                scale += f", step {_num(spec['step'])}"
        rows.append(f"| `{name}` | {kind} | {values} | {scale} |")
    return rows


def study_note(cfg: StudyConfig, space_raw: dict[str, Any], data_report: list[str]) -> str:
    """The study's note in optuna-dashboard (Markdown): what was searched, on which data and model, and how
    to read the trials' curves and user attributes."""
    from llmflow_hpo.study.storage import library_versions

    raw = config_to_dict(cfg)
    model = cfg.model
    model_line = f"`{model.name_or_path}`" + (
        " with random initial weights (`random_init: true`)" if model.random_init else ", pretrained weights"
    )
    if model.config_overrides:
        model_line += f"; config overrides `{json.dumps(model.config_overrides, sort_keys=True)}`"
    data = cfg.data
    files = []
    for split in ("train", "dev", "test"):
        path, limit = getattr(data, split), getattr(data, f"limit_{split}")
        if path is not None:
            files.append(f"- {split}: `{path}`" + (f" (first {limit} examples)" if limit is not None else ""))
        else:
            amount = getattr(data, f"{split}_split")
            share = f"{amount * 100:g}%" if isinstance(amount, float) else f"{amount} examples"
            files.append(f"- {split}: no file, {share} held out of train")
    if cfg.backend == "ray":
        stopping = f"Ray Tune's `{cfg.ray.scheduler}` scheduler" + (
            f" `{json.dumps(cfg.ray.scheduler_options, sort_keys=True)}`" if cfg.ray.scheduler_options else ""
        )
    else:
        stopping = f"`{cfg.pruner.name}`" + (
            f" `{json.dumps(cfg.pruner.options, sort_keys=True)}`" if cfg.pruner.options else ""
        )
    sampler = f"`{cfg.sampler.name}`" + (
        f" `{json.dumps(cfg.sampler.options, sort_keys=True)}`" if cfg.sampler.options else ""
    )
    fixed = ", ".join(f"{k}={_num(v)}" for k, v in raw["train"].items() if k not in space_raw)
    budget = f"{cfg.n_trials} finished (complete or pruned) trials" if cfg.n_trials is not None else "no trial limit"
    if cfg.timeout is not None:
        budget += f", no new trial after {cfg.timeout:g} s"
    versions = library_versions()
    lines = [
        f"## {cfg.study_name}: {cfg.task}",
        "",
        f"**Objective**: {cfg.direction} the dev `{cfg.metric}` of each trial's best evaluation.  ",
        f"**Model**: {model_line}.  ",
        f"**Search**: {sampler} sampler (seed {cfg.seed}), stopping by {stopping} (backend {cfg.backend}); {budget}.",
        "",
        "### Data",
        "",
        f"Format `{data.format}`, max_length {data.max_length} subword tokens; files:",
        "",
        *files,
        "",
        "As read (the study's `data_report`):",
        "",
        *(f"- {line}" for line in data_report),
        "",
        "### Search space",
        "",
        *_space_rows(space_raw),
        "",
        f"Fixed training settings (not searched): {fixed}.",
        "",
        "### Reading the trials",
        "",
        f"- **Learning curves**: intermediate values are the dev `{cfg.metric}` at a step counted in training "
        "examples seen, the same unit for every trial (trials with different batch sizes are compared at "
        "equal data seen; one epoch is as many steps as the train split has examples); "
        f"{cfg.train.evals_per_epoch} evaluation(s) per epoch. The {'scheduler' if cfg.backend == 'ray' else 'pruner'} "
        "compares trials at the same step.",
        f"- **Value**: the dev `{cfg.metric}` of the trial's best evaluation (not the last one).",
        "- **User attributes** of a trial:",
        *(
            f"  - {', '.join(f'`{name}`' for name in names.split(', '))}: {meaning.format(metric=cfg.metric)}"
            for names, meaning in TRIAL_ATTRS + (RAY_TRIAL_ATTRS if cfg.backend == "ray" else ())
        ),
        "- **Study user attributes**: `config` (the resolved study config), `search_space`, `data_report`, "
        "`metric`, `versions`; `llmflow-hpo retrain-best` needs only them and the best trial.",
        "",
        f"Written by llmflow-hpo {__version__} (optuna {versions['optuna']}, torch {versions['torch']}, "
        f"transformers {versions['transformers']}).",
    ]
    return "\n".join(lines) + "\n"


def write_study_note(study: optuna.Study, cfg: StudyConfig, space_raw: dict[str, Any], data_report: list[str]) -> None:
    """Write the study note unless the study has one (a note the user edited in the dashboard stays)."""
    from optuna_dashboard import get_note, save_note

    if not get_note(study).strip():
        save_note(study, study_note(cfg, space_raw, data_report))


# ---------------------------------------------------------------------------------------- the server


def only_storage_here() -> str:
    """Without ``--study`` and ``--storage``: the one optuna database in ``studies/`` (MLflow's is not)."""
    from llmflow_hpo.study.storage import is_optuna_sqlite

    found = sorted(p for p in Path("studies").glob("*.db") if is_optuna_sqlite(p))
    if len(found) == 1:
        return f"sqlite:///{found[0].resolve()}"
    held = f"{len(found)} ({', '.join(p.name for p in found)})" if found else "none"
    raise StorageError(
        f"no --storage given and studies/*.db here: {held}; pass --storage URL (e.g. sqlite:///studies/NAME.db) "
        "or --study NAME"
    )


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open connection never holds up the exit

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up in DNS (socket.getfqdn), which hangs on machines without it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # the browser went away mid-answer
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no line per request on stderr
        pass


def _url_host(host: str) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{shown}]" if ":" in shown else shown


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Stop(Exception):
    """SIGTERM: leave serve_forever like Ctrl-C does."""


@dataclass
class Dashboard:
    """optuna-dashboard listening on ``host:port``; ``url`` is the study's page (or the study list)."""

    server: WSGIServer
    url: str
    host: str
    port: int
    storage: str
    study: str | None

    def serve(self) -> int:
        """Answer requests until Ctrl-C or SIGTERM (or ``shutdown`` from another thread); returns 0."""
        in_main = threading.current_thread() is threading.main_thread()

        def stop(signum: int, frame: Any) -> None:
            raise _Stop

        previous = signal.signal(signal.SIGTERM, stop) if in_main else None
        try:
            self.server.serve_forever()
        except (KeyboardInterrupt, _Stop):
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.server.server_close()
        return 0

    def shutdown(self) -> None:
        self.server.shutdown()


def open_dashboard(
    storage: str,
    *,
    study: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    log: Callable[[str], None] | None = None,
) -> Dashboard:
    """optuna-dashboard on ``storage``, bound to ``host:port`` (0: a free port) and ready to ``serve``."""
    from llmflow_hpo.study.storage import open_storage, require_study

    rdb = open_storage(storage, existing=True)
    study_id = None
    if study is not None:
        require_study(rdb, study, storage)  # an unknown name: one line listing the studies there
        study_id = rdb.get_study_id_from_name(study)
    import optuna_dashboard

    app = optuna_dashboard.wsgi(rdb)
    server_class = _Server6 if ":" in host else _Server
    try:
        server = server_class((host, port), _QuietHandler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise LlmflowError(
                f"--port {port}: port {port} on {host} is already in use (another dashboard?); "
                "pass another --port, or --port 0 to pick a free one"
            ) from None
        if e.errno == errno.EACCES:
            raise LlmflowError(
                f"--port {port}: not allowed to listen on port {port} (ports below 1024 need root); "
                "pass --port 8080, or --port 0 to pick a free one"
            ) from None
        raise LlmflowError(
            f"--host {host}: cannot listen on this address ({e.strerror or e}); pass --host 127.0.0.1 "
            "(this machine only) or --host 0.0.0.0 (every network interface)"
        ) from None
    server.set_app(app)
    real_port = int(server.server_address[1])
    page = f"/dashboard/studies/{study_id}" if study_id is not None else "/dashboard"
    if log is not None and not _is_loopback(host):
        log(
            f"warning: optuna-dashboard has no login; anyone who reaches {host}:{real_port} can read, edit and "
            "delete the studies in this storage"
        )
    return Dashboard(
        server=server,
        url=f"http://{_url_host(host)}:{real_port}{page}",
        host=host,
        port=real_port,
        storage=storage,
        study=study,
    )
