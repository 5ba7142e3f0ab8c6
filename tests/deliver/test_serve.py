"""serve: the real server as a process (the CLI), real HTTP requests: every endpoint, every error status, the
API key, the Prometheus counts, micro-batching, and SIGTERM under load with no reply lost."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

KEY = "s3cret-key-for-tests"


class Server:
    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmflow_hpo", "serve", str(model), "--port", "0", *args],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.log: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if match := re.search(r"on (http://\S+) \(docs", line):
                self.url = match.group(1)
                threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
                return
        self.proc.kill()
        raise AssertionError("the server did not start: " + "".join(self.log)[-3000:])

    def metric(self, name: str, headers: dict[str, str] | None = None, **labels: str) -> float:
        """The value of a Prometheus sample of /metrics (0 when it is not there yet)."""
        text = httpx.get(self.url + "/metrics", headers=headers).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
        found = re.search("^" + pattern + "$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def guarded(text_model):
    """The text model behind an API key and small limits. A lone text waits up to 3 s for others to batch with
    and times out at 1 s (504); a request of 4 texts fills a batch and runs at once."""
    server = Server(
        text_model,
        *("--batch-size", "4", "--max-wait-ms", "3000", "--timeout", "1", "--max-queue", "5"),
        *("--max-texts", "4", "--max-chars", "200", "--max-body-bytes", "2000"),
        env={"LLMFLOW_API_KEY": KEY},
    )
    yield server
    server.stop()


H = {"X-API-Key": KEY}
FOUR = {"texts": ["a good film", "bad acting", "good story", "dull film"]}


def test_endpoints_answer_with_the_model_folders_facts(guarded, text_model):
    import json

    assert httpx.get(guarded.url + "/health").json() == {"status": "ok"}  # no key needed
    info = httpx.get(guarded.url + "/info", headers=H).json()
    metrics = json.loads((text_model / "metrics.json").read_text())
    assert info["task"] == "text-classification" and info["labels"] == ["neg", "pos"]
    assert (info["study"], info["trial"], info["test"]) == (metrics["study"], metrics["trial"], metrics["test"])
    assert info["versions"]["llmflow-hpo"] and info["limits"]["api_key"] is True and KEY not in json.dumps(info)
    r = httpx.post(guarded.url + "/predict", json=FOUR, headers=H)
    assert r.status_code == 200
    predictions = r.json()["predictions"]
    assert [p["text"] for p in predictions] == FOUR["texts"]
    assert all(set(p["probabilities"]) == {"neg", "pos"} and p["label"] in ("neg", "pos") for p in predictions)
    assert (
        httpx.post(guarded.url + "/predict", json=FOUR, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    )
    assert "/predict" in httpx.get(guarded.url + "/openapi.json", headers=H).json()["paths"]
    assert "swagger" in httpx.get(guarded.url + "/docs", headers=H).text.lower()


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"texts": "not a list"}, 422, "texts"),
        ({"text": 3}, 422, "text"),
        ({}, 422, "exactly one of"),
        ({"text": "a", "texts": ["b"]}, 422, "exactly one of"),
        ({"texts": []}, 422, "no text"),
        ({"texts": ["   "]}, 422, "text 0: the text is empty"),
        ({"texts": ["a"] * 5}, 413, "5 texts"),
        ({"text": "x" * 201}, 413, "201 characters"),
        ({"text": "y" * 1990}, 413, "bytes"),
        ({"txt": "a"}, 422, "txt"),
    ],
)
def test_bad_requests_get_a_json_error_with_their_status(guarded, body, status, says):
    r = httpx.post(guarded.url + "/predict", json=body, headers=H)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and says in error["message"], error


def test_not_json_a_missing_or_wrong_key_and_the_server_lives_on(guarded):
    r = httpx.post(guarded.url + "/predict", content=b"{not json", headers=H)
    assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY + "x"}):
        for path in ("/predict", "/info", "/metrics"):
            r = httpx.request("POST" if path == "/predict" else "GET", guarded.url + path, json=FOUR, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(guarded.url + "/health").status_code == 200
    assert httpx.post(guarded.url + "/predict", json=FOUR, headers=H).status_code == 200


def test_timeout_is_504_a_full_queue_is_503_and_metrics_count_them(guarded):
    before_ok = guarded.metric("llmflow_requests_total", H, endpoint="/predict", status="200")
    before_401 = guarded.metric("llmflow_errors_total", H, endpoint="/predict", reason="unauthorized")
    started = time.monotonic()
    r = httpx.post(guarded.url + "/predict", json={"text": "a lone text"}, headers=H)  # would wait 3 s for company
    assert r.status_code == 504 and "1 s" in r.json()["error"]["message"]
    assert 0.9 < time.monotonic() - started < 2.5
    while guarded.metric("llmflow_queue_texts", H) > 0:  # the timed-out text leaves the queue at its batch
        time.sleep(0.02)
    lone_status: list[int] = []

    def lone() -> None:
        lone_status.append(httpx.post(guarded.url + "/predict", json={"text": "a"}, headers=H).status_code)

    threads = [threading.Thread(target=lone) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while guarded.metric("llmflow_queue_texts", H) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    r = httpx.post(guarded.url + "/predict", json=FOUR, headers=H)  # 2 waiting + 4 > max_queue 5
    assert r.status_code == 503 and "overloaded" in r.json()["error"]["message"]
    for t in threads:
        t.join()
    assert lone_status == [504, 504]
    for _ in range(3):
        assert httpx.post(guarded.url + "/predict", json=FOUR, headers=H).status_code == 200
    httpx.post(guarded.url + "/predict", json=FOUR, headers={"X-API-Key": "nope"})
    assert guarded.metric("llmflow_requests_total", H, endpoint="/predict", status="200") == before_ok + 3
    assert guarded.metric("llmflow_requests_total", H, endpoint="/predict", status="504") >= 3
    assert guarded.metric("llmflow_requests_total", H, endpoint="/predict", status="503") == 1
    assert guarded.metric("llmflow_errors_total", H, endpoint="/predict", reason="overloaded") == 1
    assert guarded.metric("llmflow_errors_total", H, endpoint="/predict", reason="unauthorized") == before_401 + 1
    assert guarded.metric("llmflow_request_latency_seconds_count", H, endpoint="/predict") >= before_ok + 8
    assert guarded.metric("llmflow_batch_size_count", H) >= 4


def test_sigterm_under_load_answers_every_request_in_flight_then_exits_0(ner_model):
    """16 requests wait in one micro-batch (1.5 s window) when SIGTERM comes: all are answered, in one batch,
    and the server exits 0. The key never appears in its log."""
    server = Server(ner_model, "--batch-size", "64", "--max-wait-ms", "1500", "--api-key", KEY)
    words = ["John", "Smith", "visited", "Paris", "."]
    r = httpx.post(server.url + "/predict", json={"words": [words]}, headers=H)
    assert r.status_code == 200 and r.json()["predictions"][0]["words"] == words
    results: list[object] = []

    def send(i: int) -> None:
        try:
            results.append(
                httpx.post(server.url + "/predict", json={"text": f"Ada met Bob {i} times ."}, headers=H, timeout=30)
            )
        except httpx.HTTPError as e:
            results.append(e)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while server.metric("llmflow_queue_texts", H) < 16 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.metric("llmflow_queue_texts", H) == 16
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert server.proc.wait(timeout=60) == 0
    assert [getattr(r, "status_code", r) for r in results] == [200] * 16
    assert sorted(int(r.json()["predictions"][0]["words"][3]) for r in results) == list(range(16))
    log = "".join(server.log)
    assert "stopped" in log and KEY not in log


def test_serving_beyond_loopback_without_a_key_is_refused(ner_model):
    from llmflow_hpo.cli import main

    env = os.environ.pop("LLMFLOW_API_KEY", None)
    try:
        assert main(["serve", str(ner_model), "--host", "0.0.0.0"]) == 1
    finally:
        if env is not None:
            os.environ["LLMFLOW_API_KEY"] = env


def test_the_listening_socket_sends_without_nagle_delay_and_names_a_taken_port():
    """Accepted connections inherit TCP_NODELAY from the listener: without it every kept-alive request waited
    40 ms for the client's delayed ACK (/health 44 ms instead of 3.5)."""
    import socket

    from llmflow_hpo.deliver.serve import listen
    from llmflow_hpo.errors import LlmflowError

    sock = listen("127.0.0.1", 0)
    try:
        sock.listen()
        client = socket.create_connection(sock.getsockname())
        accepted, _ = sock.accept()
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        accepted.close()
        client.close()
        with pytest.raises(LlmflowError, match="cannot listen there"):
            listen("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
