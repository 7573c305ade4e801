"""Engine failures: a failing step fails its requests only; a dead engine process is detected."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.e2e.faulty_engine import MODEL_FAULT_TOKEN, STEP_FAULT_TOKEN
from tests.e2e.harness import ServerProcess, get_metrics, metric, sse_events, wait_for

GOOD = {"model": "tiny", "prompt": [100, 101, 102], "max_tokens": 4, "temperature": 0.0}


@pytest.fixture(scope="module")
def faulty_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("faulty") / "server.log", "--served-model-name", "tiny",
                        env={"KVSERVE_ENGINE_FACTORY": "tests.e2e.faulty_engine:FaultyEngine"})
    srv.wait_ready()
    yield srv
    srv.stop()


def _good(srv: ServerProcess) -> str:
    resp = httpx.post(srv.base_url + "/v1/completions", json=GOOD, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_model_failure_fails_only_its_request(faulty_server: ServerProcess) -> None:
    expected = _good(faulty_server)
    bad = dict(GOOD, prompt=[100, MODEL_FAULT_TOKEN, 101])
    resp = httpx.post(faulty_server.base_url + "/v1/completions", json=bad, timeout=60)
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    assert "injected model failure" in error["message"]

    with httpx.stream("POST", faulty_server.base_url + "/v1/completions", json=dict(bad, stream=True),
                      timeout=60) as stream:
        events = sse_events(stream.iter_lines())
    assert "error" in events[-2] and events[-1] == "[DONE]"

    assert _good(faulty_server) == expected  # the engine kept serving, with the same results
    m = get_metrics(faulty_server.base_url)
    assert metric(m, "vllm:request_success_total", finished_reason="error") == 2
    assert metric(m, "vllm:kv_cache_usage_perc") == 0


def test_exception_escaping_step_is_survived(faulty_server: ServerProcess) -> None:
    expected = _good(faulty_server)
    resp = httpx.post(faulty_server.base_url + "/v1/completions", json=dict(GOOD, prompt=[100, STEP_FAULT_TOKEN]),
                      timeout=60)
    assert resp.status_code == 500
    assert "injected step failure" in resp.json()["error"]["message"]
    assert _good(faulty_server) == expected
    assert metric(get_metrics(faulty_server.base_url), "kvserve:engine_step_failures_total") == 1
    assert httpx.get(faulty_server.base_url + "/health").status_code == 200


def test_dead_engine_process_is_detected(faulty_server: ServerProcess) -> None:
    body = dict(GOOD, max_tokens=800, ignore_eos=True, stream=True)
    with httpx.stream("POST", faulty_server.base_url + "/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                break  # the request is running
        os.kill(faulty_server.engine_pid(), signal.SIGKILL)
        events = sse_events(lines)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_unavailable"

    health = wait_for(lambda: (lambda r: r if r.status_code == 503 else None)(
        httpx.get(faulty_server.base_url + "/health")), what="/health to report 503")
    assert health.json()["error"]["code"] == "engine_unavailable"
    resp = httpx.post(faulty_server.base_url + "/v1/completions", json=GOOD, timeout=30)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_unavailable"
    assert httpx.get(faulty_server.base_url + "/metrics").status_code == 200  # the API process is alive
    assert faulty_server.stop(timeout_s=30) == 0
