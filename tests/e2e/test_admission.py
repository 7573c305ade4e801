"""API key, queue limit (429 + Retry-After) and SIGTERM drain, on a server started for this module."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.e2e.harness import ServerProcess, get_metrics, metric, sse_events, wait_for

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"model": "tiny", "prompt": [100, 101, 102], "max_tokens": 4, "temperature": 0.0}


@pytest.fixture(scope="module")
def guarded(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("guarded") / "server.log", "--served-model-name",
                        "tiny", "--api-key", KEY, "--max-num-seqs", "1", "--max-queue-len", "2")
    srv.wait_ready()
    yield srv
    srv.stop()


def test_api_key_required(guarded: ServerProcess) -> None:
    import openai

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        resp = httpx.post(guarded.base_url + "/v1/completions", json=BODY, headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert resp.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/tokenize"):
        assert httpx.request("GET" if path == "/v1/models" else "POST", guarded.base_url + path,
                             json={"prompt": "x"}).status_code == 401
    # Malformed bodies are refused for the missing key first, not parsed.
    assert httpx.post(guarded.base_url + "/v1/completions", content=b"{bad").status_code == 401

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=guarded.base_url + "/v1", api_key=KEY, max_retries=0)
    assert ok.completions.create(**BODY).usage.completion_tokens == 4
    # Probes and scrapers need no key.
    assert httpx.get(guarded.base_url + "/health").status_code == 200
    assert httpx.get(guarded.base_url + "/metrics").status_code == 200


def test_api_key_covers_every_route_but_health_and_metrics(guarded: ServerProcess) -> None:
    from kvserve.entrypoints.serve_cli import register

    # FastAPI's own routes and /version too, and unknown paths (nothing is revealed without the key).
    for path in ("/openapi.json", "/docs", "/redoc", "/version", "/v1/models/tiny", "/no/such/route"):
        resp = httpx.get(guarded.base_url + path)
        assert resp.status_code == 401, path
        assert resp.json()["error"]["code"] == "invalid_api_key"
    for path in ("/openapi.json", "/docs", "/redoc", "/version"):
        assert httpx.get(guarded.base_url + path, headers=AUTH).status_code == 200, path
    for path in ("/health", "/metrics"):
        assert httpx.get(guarded.base_url + path).status_code == 200, path
    # The help says so.
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    help_text = " ".join(sub.choices["serve"].format_help().split())
    assert "every route except /health and /metrics, /openapi.json, /docs, /redoc and /version included" in help_text


def test_queue_full_gets_429_with_retry_after(guarded: ServerProcess) -> None:
    url = guarded.base_url + "/v1/completions"
    long_body = dict(BODY, max_tokens=1000, ignore_eos=True, stream=True)  # several seconds anywhere
    with httpx.Client(timeout=120, headers=AUTH) as http, http.stream("POST", url, json=long_body) as running:
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # it holds the only running slot

        # Two more fill the queue (max-num-seqs 1: they wait for their first token).
        results: list[int] = []
        waiters = [threading.Thread(target=lambda: results.append(
            httpx.post(url, json=BODY, headers=AUTH, timeout=120).status_code)) for _ in range(2)]
        for t in waiters:
            t.start()
        wait_for(lambda: metric(get_metrics(guarded.base_url), "kvserve:num_requests_queued_api") == 2,
                 what="two queued requests")
        refused = httpx.post(url, json=BODY, headers=AUTH)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        # Leaving the block disconnects the long stream; the queued requests then run.
    for t in waiters:
        t.join(120)
    assert results == [200, 200]
    assert httpx.post(url, json=BODY, headers=AUTH).status_code == 200


def test_sigterm_drains_in_flight_requests(guarded: ServerProcess) -> None:
    body = dict(BODY, max_tokens=40, ignore_eos=True, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", guarded.base_url + "/v1/completions", json=body, headers=AUTH,
                      timeout=120) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        guarded.terminate()
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections while draining
            httpx.get(guarded.base_url + "/health", timeout=5)
        events = sse_events([first, *lines])
    assert events[-1] == "[DONE]"
    text_chunks = [e for e in events[:-1] if e["choices"]]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 40
    assert guarded.proc.wait(60) == 0
    assert "engine shut down" in guarded.log_text()
