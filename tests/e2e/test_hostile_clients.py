"""Clients that send too much, too slowly, or give up half-way: the server answers each with an
OpenAI error (or forgets it quietly) and keeps serving everyone else promptly."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.e2e.harness import ServerProcess, wait_for

BODY_READ_TIMEOUT_S = 1.0
MAX_REQUEST_BYTES = 4 * 2**20  # the default (the session server runs with it)


@pytest.fixture(scope="module")
def hostile(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("hostile") / "server.log", "--served-model-name",
                        "tiny", "--body-read-timeout", str(BODY_READ_TIMEOUT_S), "--log-level", "debug")
    srv.wait_ready()
    yield srv
    srv.stop()


def _raw_request(srv: ServerProcess, head_and_partial_body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    sock.sendall(head_and_partial_body)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a 60 s socket timeout fails the test)."""
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _error_of(raw_response: bytes) -> tuple[int, dict]:  # type: ignore[type-arg]
    head, _, body = raw_response.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body)["error"]


def test_huge_prompt_does_not_hold_up_small_requests(server: ServerProcess) -> None:
    """A prompt that takes seconds to tokenize runs beside small requests, not in front of them.

    Small requests go back-to-back while the big one is in flight.  Had they queued behind its
    tokenization (one tokenizer thread for all), one of them would have waited most of the big
    request's time; here each must take a small fraction of it.
    """
    big = {"model": "tiny", "prompt": "hello world " * (2_500_000 // 12), "max_tokens": 1}
    assert len(json.dumps(big)) < MAX_REQUEST_BYTES
    outcome: dict[str, object] = {}

    def send_big() -> None:
        start = time.monotonic()
        resp = httpx.post(server.base_url + "/v1/completions", json=big, timeout=300)
        outcome["status"], outcome["error"] = resp.status_code, resp.json()["error"]
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=send_big)
    thread.start()
    latencies = []
    with httpx.Client(timeout=300) as http:
        i = 0
        while thread.is_alive() or not latencies:
            body = {"model": "tiny", "prompt": "hi there" if i % 2 else [1, 2, 3], "max_tokens": 1}
            start = time.monotonic()
            assert http.post(server.base_url + "/v1/completions", json=body).status_code == 200
            latencies.append(time.monotonic() - start)
            i += 1
    thread.join()
    # The big prompt is far over the 1,024-token context: a 400 naming the prompt, after tokenizing.
    assert outcome["status"] == 400 and outcome["error"]["code"] == "context_length_exceeded"  # type: ignore[index]
    big_s = float(outcome["seconds"])  # type: ignore[arg-type]
    assert max(latencies) < big_s / 3, (max(latencies), big_s, len(latencies))


def test_body_over_the_limit_gets_413(server: ServerProcess) -> None:
    too_big = json.dumps({"model": "tiny", "prompt": "x" * MAX_REQUEST_BYTES}).encode()
    # Declared by Content-Length: refused before the body is read.
    resp = httpx.post(server.base_url + "/v1/completions", content=too_big,
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"
    assert resp.headers["connection"] == "close"

    # Chunked (no length up front): refused once the bytes read pass the limit.
    def chunks() -> Iterator[bytes]:
        for i in range(0, len(too_big), 2**20):
            yield too_big[i:i + 2**20]

    resp = httpx.post(server.base_url + "/v1/completions", content=chunks(), timeout=60)
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_half_sent_body_gets_408_and_the_connection_closes(hostile: ServerProcess) -> None:
    sock = _raw_request(hostile, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
    with sock:
        start = time.monotonic()
        status, error = _error_of(_read_until_closed(sock))
        waited = time.monotonic() - start
    assert status == 408
    assert error["code"] == "request_timeout"
    assert waited >= BODY_READ_TIMEOUT_S * 0.9  # the client had its full timeout


def test_aborted_upload_logs_one_debug_line(hostile: ServerProcess) -> None:
    marker = "client disconnected before sending its whole body"
    before = hostile.log_text().count(marker)
    sock = _raw_request(hostile, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"messages\": [")
    sock.close()
    wait_for(lambda: hostile.log_text().count(marker) > before, what="the disconnect to be logged")
    log = hostile.log_text()
    assert log.count(marker) == before + 1
    assert "DEBUG" in next(line for line in log.splitlines() if marker in line)
    assert "Traceback" not in log and "ClientDisconnect" not in log
    assert httpx.get(hostile.base_url + "/health").status_code == 200
