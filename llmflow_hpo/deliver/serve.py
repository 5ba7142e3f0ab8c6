"""``llmflow-hpo serve``: a model folder behind an HTTP API (FastAPI on uvicorn).

Endpoints: ``POST /predict`` (``{"text": ...}``, ``{"texts": [...]}``, NER ``{"words": [[...], ...]}``, causal-lm
``{"messages": [...]}``), ``GET /health``, ``GET /info`` (the model folder's task, labels, study, trial and
scores), ``GET /metrics`` (Prometheus) and the OpenAPI docs at ``/docs``.

Concurrent requests are micro-batched: the texts of requests that arrive within ``max_wait_ms`` of the first
waiting one are run together, up to ``max_batch`` texts, in one model thread (torch uses the cores within it).
Every bad request gets a JSON error with its status: 422 for a wrong body, 413 for a body, a text or a text
count over the limits, 503 when the queue is full, 504 past the request's time limit, 401 for a missing or
wrong API key (compared in constant time; never logged). On SIGTERM uvicorn stops accepting connections, the
requests in flight are answered (the batcher keeps running until they are), and the process exits 0.

FastAPI, uvicorn and prometheus-client are imported with this module (``pip install 'llmflow-hpo[serve]'``).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ServeSettings", "create_app", "listen"]


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits and batching (the ``serve`` command's options)."""

    micro_batching: bool = True
    max_batch: int = 32  # texts run together at most
    max_wait_ms: float = 5.0  # how long the first waiting text waits for others
    max_queue: int = 512  # texts waiting at most; more: 503
    max_texts: int = 64  # texts per request; more: 413
    max_chars: int = 10_000  # characters per text; more: 413
    max_body_bytes: int = 1_000_000  # request body; more: 413
    timeout_s: float = 30.0  # a request not answered within it: 504
    api_key: str | None = None  # required on every endpoint but /health when set


class PredictBody(BaseModel):
    """Exactly one of: a text, a list of texts, a list of sentences as words (NER), a chat (causal-lm)."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    texts: list[str] | None = None
    words: list[list[str]] | None = None
    messages: list[dict[str, str]] | None = None

    def items(self) -> list[Any]:
        given = [name for name in ("text", "texts", "words", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise _HTTPError(
                422, f"give exactly one of text, texts, words, messages (got {', '.join(given) or 'none'})"
            )
        if self.text is not None:
            return [self.text]
        if self.messages is not None:
            return [self.messages]
        return list(self.texts if self.texts is not None else self.words)  # type: ignore[arg-type]


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.reason = reason or {401: "unauthorized", 413: "too_large", 422: "invalid", 503: "overloaded"}.get(
            status, "error"
        )


@dataclass
class _Item:
    value: Any
    future: asyncio.Future
    abandoned: bool = False  # its request timed out: not run when not started, no longer counted as waiting
    taken: bool = False  # in a batch


@dataclass
class _Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("llmflow_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.errors = Counter("llmflow_errors", "requests answered with an error", ["endpoint", "reason"], registry=r)
        self.latency = Histogram(
            "llmflow_request_latency_seconds",
            "request latency",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.batch = Histogram(
            "llmflow_batch_size", "texts per model batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.texts = Counter("llmflow_predicted_texts", "texts predicted", registry=r)
        self.queue = Gauge("llmflow_queue_texts", "texts waiting for the model", registry=r)


class _Batcher:
    """Runs the waiting texts in batches on one model thread; requests await their texts' futures."""

    def __init__(self, predictor: Any, settings: ServeSettings, metrics: _Metrics) -> None:
        self.predictor, self.settings, self.metrics = predictor, settings, metrics
        self.waiting: deque[list[_Item]] = deque()  # one entry per request: its texts stay together
        self.queued = 0
        self.wake = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None

    def submit(self, values: list[Any]) -> list[_Item]:
        if self.queued + len(values) > self.settings.max_queue:
            raise _HTTPError(503, f"the server is overloaded ({self.queued} texts waiting); retry later")
        loop = asyncio.get_running_loop()
        items = [_Item(v, loop.create_future()) for v in values]
        self.waiting.append(items)
        self.queued += len(items)
        self.metrics.queue.set(self.queued)
        self.wake.set()
        return items

    async def run(self) -> None:
        s = self.settings
        while True:
            while not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            if s.micro_batching and s.max_wait_ms > 0:
                deadline = time.monotonic() + s.max_wait_ms / 1000
                while self.queued < s.max_batch and (left := deadline - time.monotonic()) > 0:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), left)
                    except asyncio.TimeoutError:
                        break
            await self._run_batch(self._take())

    def _take(self) -> list[_Item]:
        """The next batch: whole requests, up to max_batch texts (a bigger request alone); one request
        without micro-batching."""
        batch = list(self.waiting.popleft())
        while (
            self.settings.micro_batching
            and self.waiting
            and len(batch) + len(self.waiting[0]) <= self.settings.max_batch
        ):
            batch.extend(self.waiting.popleft())
        batch = [item for item in batch if not item.abandoned]
        for item in batch:
            item.taken = True
        self.queued -= len(batch)
        self.metrics.queue.set(self.queued)
        return batch

    def abandon(self, items: list[_Item]) -> None:
        """A timed-out request's texts: the ones not yet in a batch are dropped from the queue."""
        for item in items:
            if not item.taken and not item.abandoned:
                item.abandoned = True
                self.queued -= 1
        self.metrics.queue.set(self.queued)

    async def _run_batch(self, batch: list[_Item]) -> None:
        if not batch:
            return
        self.metrics.batch.observe(len(batch))
        loop = asyncio.get_running_loop()
        try:
            records = await loop.run_in_executor(self.executor, self.predictor.predict, [i.value for i in batch])
        except Exception as e:  # the model failed on this batch: its requests get a 500, the server lives on
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        self.metrics.texts.inc(len(batch))
        for item, record in zip(batch, records, strict=True):
            if not item.future.done():
                item.future.set_result(record)

    async def drain(self) -> None:
        """Until no text waits (shutdown: the requests in flight are answered first)."""
        while self.waiting:
            await asyncio.sleep(0.01)


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket (port 0: a free one), or a LlmflowError naming the address.

    TCP_NODELAY is set on it, and the connections it accepts inherit it: without it, a response written in two
    parts (headers, then body) waits under Nagle's algorithm for the client's delayed ACK, 40 ms on Linux,
    on every request of a kept-alive connection (measured: /health 44 ms instead of 3.5 ms)."""
    from llmflow_hpo.errors import LlmflowError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LlmflowError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock


def _check_key(request: Request, key: str) -> None:
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:]
    if given is None or not secrets.compare_digest(given.encode(), key.encode()):
        raise _HTTPError(401, "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


def create_app(predictor: Any, settings: ServeSettings) -> FastAPI:
    """The FastAPI app that serves ``predictor`` (``deliver.predict.Predictor``)."""
    from contextlib import asynccontextmanager

    metrics = _Metrics()
    state: dict[str, _Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = _Batcher(predictor, settings, metrics)
        batcher.task = asyncio.create_task(batcher.run())
        state["batcher"] = batcher
        yield
        await batcher.drain()  # uvicorn waited for the open requests; nothing is left behind
        batcher.task.cancel()
        batcher.executor.shutdown(wait=True)

    info = predictor.folder.info() | {"runtime": predictor.runtime_name}
    app = FastAPI(title=f"llmflow-hpo: {info['study']} trial {info['trial']} ({info['task']})", lifespan=lifespan)

    @app.middleware("http")
    async def count_and_guard(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        endpoint = request.url.path if request.url.path in _ENDPOINTS else "other"
        try:
            if settings.api_key is not None and request.url.path != "/health":
                _check_key(request, settings.api_key)
            response = await call_next(request)
        except _HTTPError as e:
            response = _error(e.status, e.message)
            metrics.errors.labels(endpoint, e.reason).inc()
        else:
            if response.status_code >= 400:
                reason = response.headers.get("x-error-reason", "error")
                metrics.errors.labels(endpoint, reason).inc()
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def model_info() -> dict[str, Any]:
        return info | {"limits": settings.__dict__ | {"api_key": settings.api_key is not None}}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/predict",
        openapi_extra={
            "requestBody": {
                "content": {"application/json": {"schema": PredictBody.model_json_schema()}},
                "required": True,
            }
        },
    )
    async def predict(request: Request) -> Response:
        try:
            return JSONResponse({"predictions": await _predict(request, state["batcher"], predictor, settings)})
        except _HTTPError as e:
            response = _error(e.status, e.message)
            response.headers["x-error-reason"] = e.reason
            return response
        except Exception as e:  # a model error: a 500 with its reason; the server keeps serving
            response = _error(500, f"prediction failed: {type(e).__name__}: {e}")
            response.headers["x-error-reason"] = "model"
            return response

    return app


_ENDPOINTS = ("/predict", "/health", "/info", "/metrics", "/docs", "/openapi.json")


async def _predict(request: Request, batcher: _Batcher, predictor: Any, settings: ServeSettings) -> list[Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
        raise _HTTPError(413, f"the body has {length} bytes; the limit is {settings.max_body_bytes}")
    body = await request.body()
    if len(body) > settings.max_body_bytes:
        raise _HTTPError(413, f"the body has {len(body)} bytes; the limit is {settings.max_body_bytes}")
    try:
        values = PredictBody.model_validate_json(body).items()
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise _HTTPError(422, f"{where}: {first['msg']}") from None
    if not values:
        raise _HTTPError(422, "no text to predict")
    if len(values) > settings.max_texts:
        raise _HTTPError(413, f"{len(values)} texts in one request; the limit is {settings.max_texts}")
    for i, value in enumerate(values):
        chars = len(value) if isinstance(value, str) else sum(len(str(v)) for v in value)
        if chars > settings.max_chars:
            raise _HTTPError(413, f"text {i} has {chars} characters; the limit is {settings.max_chars}")
    inputs = []
    for i, value in enumerate(values):
        try:
            inputs.append(predictor.parse(value))
        except ValueError as e:
            raise _HTTPError(422, f"text {i}: {e}") from None
    items = batcher.submit(inputs)
    try:
        return list(await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), settings.timeout_s))
    except asyncio.TimeoutError:
        batcher.abandon(items)
        raise _HTTPError(504, f"no answer within {settings.timeout_s:g} s", reason="timeout") from None
