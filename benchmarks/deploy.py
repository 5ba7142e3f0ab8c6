"""Deployment benchmark: `llmflow-hpo serve` under a bounded load test, `predict` on a full test file, and
the ONNX export's check, against a plain baseline.

Load test (``load``): each server variant is started as a process on loopback, and a fixed number of requests
(one text each, drawn in order from the model's dev texts) is sent by 1, 8 and 32 concurrent clients (httpx,
asyncio, one process), within a time bound per cell. Reported per cell: throughput (requests/s), p50 / p95 /
p99 latency (ms) and errors. Variants:

- ``torch-batched``: llmflow-hpo serve, PyTorch, micro-batching on (5 ms window, 32 texts at most);
- ``torch-single``: the same with ``--no-batching`` (one request per forward pass);
- ``int8-batched`` / ``int8-single``: ``--runtime onnx --int8`` (export the model first: ``export``);
- ``pipeline``: the plain baseline, a minimal FastAPI app that calls a ``transformers`` pipeline once per request
  (this file's ``baseline`` command).

    python benchmarks/deploy.py export  --models runs/quickstart-ner runs/sst2
    python benchmarks/deploy.py load    --models runs/quickstart-ner runs/sst2 --out benchmarks/results/deploy_load.json
    python benchmarks/deploy.py predict --model runs/conll --input ../shared/data/conll2003/test.txt \
        --out benchmarks/results/deploy_predict.json
    python benchmarks/deploy.py table   --load benchmarks/results/deploy_load.json

Run nothing else heavy beside it: the clients and the server share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "torch-batched": [],
    "torch-single": ["--no-batching"],
    "int8-batched": ["--runtime", "onnx", "--int8"],
    "int8-single": ["--runtime", "onnx", "--int8", "--no-batching"],
    "pipeline": None,  # the baseline server
}


def dev_texts(model: Path, n: int) -> list[str]:
    """The first ``n`` texts of the model's dev file, as plain strings (NER: the words joined by spaces)."""
    sys.path.insert(0, str(REPO))
    from llmflow_hpo.data.splits import read_file_examples
    from llmflow_hpo.deliver.model_folder import ModelFolder

    folder = ModelFolder.open(model)
    examples, _ = read_file_examples(folder.cfg.data.dev, task=folder.cfg.task, data=folder.cfg.data, limit=n)
    return [" ".join(e.tokens) if hasattr(e, "tokens") else e.text for e in examples]


class Server:
    """A server process on a free loopback port: llmflow-hpo serve with ``args``, or the pipeline baseline."""

    def __init__(self, model: Path, args: list[str] | None) -> None:
        if args is None:
            cmd = [sys.executable, __file__, "baseline", str(model)]
        else:
            cmd = [sys.executable, "-m", "llmflow_hpo", "serve", str(model), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO)
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            if match := re.search(r"on (http://\S+)", line):
                self.url = match.group(1)
                threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
                return
        raise RuntimeError("server did not start:\n" + "".join(lines)[-3000:])

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


async def _load(url: str, texts: list[str], clients: int, requests: int, seconds: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal sent, errors
            while sent < requests and time.perf_counter() < deadline:
                text = texts[sent % len(texts)]
                sent += 1
                started = time.perf_counter()
                try:
                    r = await client.post("/predict", json={"text": text})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [float("nan")] * 99
    return {
        "clients": clients,
        "requests": len(latencies) + errors,
        "errors": errors,
        "seconds": wall,
        "throughput": len(latencies) / wall,
        "p50_ms": q[49] * 1000,
        "p95_ms": q[94] * 1000,
        "p99_ms": q[98] * 1000,
    }


def cmd_load(args: argparse.Namespace) -> None:
    protocol = {k: v for k, v in vars(args).items() if k != "func"} | {"models": [str(m) for m in args.models]}
    results: dict[str, Any] = {"protocol": protocol | {"out": str(args.out)}, "cells": []}
    for model in args.models:
        texts = dev_texts(model, 256)
        for variant in args.variants:
            server = Server(model, VARIANTS[variant])
            asyncio.run(_load(server.url, texts, 4, 40, 10))  # warm-up: connections, first batches
            for clients in args.clients:
                cell = asyncio.run(_load(server.url, texts, clients, args.requests, args.seconds))
                cell |= {"model": model.name, "variant": variant}
                results["cells"].append(cell)
                print(json.dumps(cell), file=sys.stderr, flush=True)
            cell["exit_code"] = server.stop()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict[str, Any]) -> str:
    rows = [
        "| model | server | clients | requests/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cells"]:
        rows.append(
            f"| {c['model']} | {c['variant']} | {c['clients']} | {c['throughput']:.1f} | {c['p50_ms']:.1f} | "
            f"{c['p95_ms']:.1f} | {c['p99_ms']:.1f} | {c['errors']} |"
        )
    return "\n".join(rows)


def cmd_export(args: argparse.Namespace) -> None:
    for model in args.models:
        subprocess.run([sys.executable, "-m", "llmflow_hpo", "export", str(model), "--format", "onnx"], check=True)


def cmd_predict(args: argparse.Namespace) -> None:
    """predict --evaluate on a full labelled file, with each runtime; the F1 against retrain-best's test F1."""
    metrics = json.loads((args.model / "metrics.json").read_text())
    out: dict[str, Any] = {"model": str(args.model), "input": str(args.input), "retrain_best_test": metrics["test"]}
    for name, extra in (
        ("torch", []),
        ("onnx-fp32", ["--runtime", "onnx"]),
        ("onnx-int8", ["--runtime", "onnx", "--int8"]),
    ):
        cmd = [sys.executable, "-m", "llmflow_hpo", "predict", str(args.model), str(args.input), "--evaluate", "--json"]
        cmd += ["--output", str(args.workdir / f"predictions-{name}.jsonl"), "--batch-size", "64", *extra]
        started = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(result.stdout) | {"process_seconds": time.perf_counter() - started}
        print(name, json.dumps(out[name]["metrics"]), out[name]["examples_per_second"], file=sys.stderr)
    args.out.write_text(json.dumps(out, indent=2))


def cmd_baseline(args: argparse.Namespace) -> None:
    """The plain baseline: a transformers pipeline called once per request in a minimal FastAPI app."""
    import socket

    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    sys.path.insert(0, str(REPO))
    from llmflow_hpo.deliver.model_folder import ModelFolder

    task = ModelFolder.open(args.model).cfg.task
    pipe = pipeline(task, model=str(args.model), device="cpu")
    pipe("warm up")
    app = FastAPI()

    @app.post("/predict")
    def predict(body: dict[str, Any]) -> Any:
        out = pipe(body["text"])
        return json.loads(json.dumps(out, default=float))

    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as llmflow-hpo serve: no 40 ms Nagle stall
    sock.bind(("127.0.0.1", 0))
    print(f"baseline on http://127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises the SIGTERM it shut down on: exit 0
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("load")
    p.add_argument("--models", type=Path, nargs="+", required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=400, help="requests per cell")
    p.add_argument("--seconds", type=float, default=20, help="time bound per cell")
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_load)
    p = sub.add_parser("export")
    p.add_argument("--models", type=Path, nargs="+", required=True)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("predict")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=Path("/tmp"))
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("table")
    p.add_argument("--load", type=Path, required=True)
    p.set_defaults(func=lambda a: print(table(json.loads(a.load.read_text()))))
    p = sub.add_parser("baseline")
    p.add_argument("model", type=Path)
    p.set_defaults(func=cmd_baseline)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
