"""`--drain-timeout`: at the deadline every in-flight request ends through the protocol.

Non-streaming requests get a 503 OpenAI error object, streams a final `error`
event and `[DONE]`; the log gets one summary line and no traceback.
"""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.harness import ServerProcess, get_metrics, metric, sse_events, wait_for

NUM_STREAMS = 3
NUM_PLAIN = 3
# Requests run one at a time (--max-num-seqs 1) and each asks for 1,000 tokens: the last ones
# cannot have finished, nor even started, when the 1 s deadline comes, however fast the machine.
BODY = {"model": "tiny", "prompt": [100, 101, 102], "max_tokens": 1000, "ignore_eos": True, "temperature": 0.0}


def _run(srv: ServerProcess, stream: bool, out: list[dict[str, Any]]) -> None:
    body = dict(BODY, stream=stream)
    try:
        with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=120) as resp:
            lines = list(resp.iter_lines())
            out.append({"stream": stream, "status": resp.status_code,
                        "content_type": resp.headers.get("content-type", ""), "lines": lines})
    except httpx.HTTPError as exc:  # a cut stream (incomplete chunked read) lands here
        out.append({"stream": stream, "exception": repr(exc)})


def _ended_by_drain(result: dict[str, Any]) -> bool:
    """Whether `result` is a well-formed drain ending; raises if it is neither that nor a normal finish."""
    assert "exception" not in result, result
    if not result["stream"]:
        assert result["content_type"].startswith("application/json"), result
        payload = json.loads("".join(result["lines"]))
        if result["status"] == 200:
            assert payload["choices"][0]["finish_reason"] == "length"
            return False
        assert result["status"] == 503, result
        assert payload["error"]["code"] == "server_shutting_down"
        assert payload["error"]["type"] == "service_unavailable"
        return True
    assert result["status"] == 200
    events = sse_events(result["lines"])
    assert events[-1] == "[DONE]", events[-3:]
    last = events[-2]
    if "error" in last:
        assert last["error"]["code"] == "server_shutting_down"
        return True
    assert last["choices"][0]["finish_reason"] == "length"
    return False


def test_drain_timeout_ends_requests_with_openai_errors(model_dir: Path, tmp_path: Path) -> None:
    srv = ServerProcess(model_dir, tmp_path / "server.log", "--served-model-name", "tiny", "--max-num-seqs", "1",
                        "--drain-timeout", "1")
    try:
        srv.wait_ready()
        results: list[dict[str, Any]] = []
        threads = [threading.Thread(target=_run, args=(srv, i < NUM_STREAMS, results))
                   for i in range(NUM_STREAMS + NUM_PLAIN)]
        for t in threads:
            t.start()
        total = NUM_STREAMS + NUM_PLAIN
        wait_for(lambda: (lambda m: metric(m, "vllm:num_requests_running") + metric(m, "vllm:num_requests_waiting")
                          == total)(get_metrics(srv.base_url)), what="every request in the engine")
        srv.terminate()
        for t in threads:
            t.join(120)
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
    assert len(results) == total
    ended = sum(_ended_by_drain(r) for r in results)
    assert ended >= total - 1  # at most the one running first may have finished in time
    log = srv.log_text()
    summary = [line for line in log.splitlines() if "drain timeout of 1 s reached" in line]
    assert len(summary) == 1, summary
    match = re.search(r"ending the (\d+) requests still in flight", summary[0])
    assert match and int(match.group(1)) == ended, summary[0]
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log
