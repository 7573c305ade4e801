"""Prefill/decode disaggregation end to end: real `kvserve serve --role prefill|decode` processes,
KV through the shm transport, the real `kvserve router --prefill/--decode`, the real `openai` client.

Greedy outputs equal one ordinary instance's (the session's `server`); the decode instance computes
no prompt token; then the faults, each ending with every client answered (200 or an OpenAI error)
within a bound and no KV block or export left behind.  Tests run in file order on module-scoped
processes; the last ones kill instances.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.e2e.harness import ServerProcess, get_metrics, metric, wait_for
from tests.e2e.test_router_kvserve import RouterProcess

PROMPTS = ["Hello, my name is", "The capital of France is",
           "Once upon a time in a land far away there lived a king who had three daughters, and the youngest "
           "of them was the most beautiful of all; every evening she walked",
           "Once upon a time in a land far away there lived a king who had three daughters, and the eldest"]
BOUND_S = 60.0  # every client is answered within this
TIMEOUT_S = 5  # --kv-transfer-timeout (generous: CI machines are loaded)


@pytest.fixture(scope="module")
def pd(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("pd")
    shm = logs / "kv"
    url = f"shm://{shm}"
    common = ("--served-model-name", "tiny", "--kv-transfer-timeout", str(TIMEOUT_S))
    delay = logs / "fetch_delay"  # while it exists, every fetch of d1 sleeps this many seconds
    procs = {
        "p1": ServerProcess(model_dir, logs / "p1.log", "--role", "prefill", "--kv-transfer", url, *common),
        "p2": ServerProcess(model_dir, logs / "p2.log", "--role", "prefill", "--kv-transfer", url, *common),
        "d1": ServerProcess(model_dir, logs / "d1.log", "--role", "decode", "--kv-transfer",
                            f"{url}?fetch_delay_file={delay}", *common),
    }
    routers: dict[str, RouterProcess] = {}
    try:
        for p in procs.values():
            p.wait_ready()
        health = ("--health-interval", "0.5", "--unhealthy-after", "1")
        routers["main"] = RouterProcess(logs / "router.log", "--prefill", procs["p1"].base_url, "--prefill",
                                        procs["p2"].base_url, "--decode", procs["d1"].base_url, *health).wait_ready()
        yield {"shm": shm, "logs": logs, "routers": routers, "delay": delay, **procs}
    finally:
        for r in routers.values():
            r.stop()
        for p in procs.values():
            p.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=BOUND_S)


def idle(srv: ServerProcess) -> bool:
    """No request left in the engine and no KV block held."""
    m = get_metrics(srv.base_url)
    return (metric(m, "vllm:num_requests_running") == 0 and metric(m, "vllm:num_requests_waiting") == 0
            and metric(m, "vllm:kv_cache_usage_perc") == 0)


def no_exports_left(pd: dict[str, Any]) -> bool:
    return not [f for f in os.listdir(pd["shm"]) if f.endswith(".kv")] if pd["shm"].exists() else True


def test_outputs_equal_one_instance(pd, server):
    ref, split = client(server.base_url), client(pd["routers"]["main"].url)
    for prompt in PROMPTS:
        kw: dict[str, Any] = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
        want = ref.completions.create(**kw).choices[0].text
        assert split.completions.create(**kw).choices[0].text == want
        streamed = "".join(c.choices[0].text for c in split.completions.create(stream=True, **kw) if c.choices)
        assert streamed == want
    msgs = [{"role": "user", "content": PROMPTS[2]}]
    kw = dict(model="tiny", messages=msgs, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert (split.chat.completions.create(**kw).choices[0].message.content
            == ref.chat.completions.create(**kw).choices[0].message.content)


def test_decode_instance_computes_no_prompt_token(pd):
    d = get_metrics(pd["d1"].base_url)
    assert metric(d, "kvserve:instance_info", role="decode", block_size="16") == 1
    assert metric(d, "kvserve:prompt_tokens_computed_total") == 0
    imported = metric(d, "kvserve:kv_transfer_tokens_total", direction="in")
    cached = metric(d, "kvserve:kv_transfer_cached_tokens_total")
    assert imported > 0 and cached > 0  # the shared prefix came from the decode's own prefix cache
    n = (metric(d, "kvserve:kv_transfer_requests_total", outcome="imported")
         + metric(d, "kvserve:kv_transfer_requests_total", outcome="all_cached"))
    assert n == 2 * len(PROMPTS) + 1  # every request of the parity test was transferred
    exported = sum(metric(get_metrics(pd[p].base_url), "kvserve:kv_transfer_tokens_total", direction="out")
                   for p in ("p1", "p2"))
    assert exported == imported + cached  # every prompt token: computed once, on a prefill instance
    wait_for(lambda: idle(pd["d1"]) and no_exports_left(pd), what="decode idle, exports consumed")


def test_transfer_timeout_is_an_error_not_a_hang(pd):
    pd["delay"].write_text(str(TIMEOUT_S + 3))
    t0 = time.monotonic()
    try:
        with pytest.raises(openai.APIStatusError) as err:
            client(pd["routers"]["main"].url).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5)
    finally:
        pd["delay"].unlink()
    assert time.monotonic() - t0 < BOUND_S
    assert err.value.status_code == 503 and "kv_transfer_failed" in str(err.value.body)
    m = get_metrics(pd["d1"].base_url)
    assert metric(m, "kvserve:kv_transfer_requests_total", outcome="failed_timeout") == 2  # both rounds
    assert metric(m, "kvserve:prompt_tokens_computed_total") == 0  # never recomputed in its place
    router = get_metrics(pd["routers"]["main"].url)
    assert metric(router, "kvserve:router_pd_requests_total", outcome="transfer_retried") == 1
    wait_for(lambda: idle(pd["d1"]) and no_exports_left(pd), what="decode idle, exports released")


def _stream_lines(url: str, body: dict[str, Any], first_only: bool = False) -> list[str]:
    lines: list[str] = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=BOUND_S) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line:
                lines.append(line)
                if first_only:
                    break
    return lines


def test_router_restarted(pd):
    r = pd["routers"]["main"]
    body = {"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_stream_lines, r.url, body)
        wait_for(lambda: metric(get_metrics(pd["d1"].base_url), "vllm:num_requests_running") > 0,
                 what="a stream running on the decode instance")
        r.proc.send_signal(signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):  # the client's connection went with the router
            fut.result(BOUND_S)
    r.proc.wait(10)
    # The instances see the connection close and abort: nothing left behind.
    wait_for(lambda: idle(pd["d1"]) and idle(pd["p1"]) and idle(pd["p2"]), what="instances idle")
    args = ["--prefill", pd["p1"].base_url, "--prefill", pd["p2"].base_url, "--decode", pd["d1"].base_url,
            "--health-interval", "0.5", "--unhealthy-after", "1"]
    pd["routers"]["main"] = RouterProcess(pd["logs"] / "router2.log", *args).wait_ready()
    out = client(pd["routers"]["main"].url).completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4)
    assert out.choices[0].finish_reason == "length"


def _one(url: str, i: int) -> str:
    try:
        client(url).completions.create(model="tiny", prompt=f"{PROMPTS[2]} {i}" * 3, max_tokens=8)
        return "200"
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        assert "message" in body or "error" in body or exc.status_code >= 500, exc  # an OpenAI error
        return str(exc.status_code)


def test_prefill_killed_mid_transfer(pd):
    url = pd["routers"]["main"].url
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_one, url, i) for i in range(8)]
        time.sleep(0.3)
        pd["p1"].proc.send_signal(signal.SIGKILL)
        results = [f.result(BOUND_S) for f in futures]
    assert time.monotonic() - t0 < BOUND_S
    assert all(r in ("200", "502", "503", "504") for r in results), results
    assert "200" in results  # p2 took over
    wait_for(lambda: idle(pd["d1"]) and idle(pd["p2"]), what="instances idle")
    # Exports p1 left behind unread (its answer never reached the router) are swept by the
    # other instances on the directory.
    wait_for(lambda: no_exports_left(pd), what="p1's orphaned exports swept")


def test_decode_killed_mid_stream(pd):
    body = {"model": "tiny", "prompt": PROMPTS[3], "max_tokens": 600, "ignore_eos": True, "stream": True}
    url = pd["routers"]["main"].url
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_stream_lines, url, body)
        wait_for(lambda: metric(get_metrics(pd["d1"].base_url), "vllm:num_requests_running") > 0,
                 what="a stream running on the decode instance")
        pd["d1"].proc.send_signal(signal.SIGKILL)
        lines = fut.result(BOUND_S)
    assert time.monotonic() - t0 < BOUND_S
    events = [line[5:].strip() for line in lines if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    assert "error" in json.loads(events[-2])  # the router ended the stream with an OpenAI error event
    wait_for(lambda: idle(pd["p2"]), what="prefill idle")
    # The stream's export was consumed when its decode started; the gauge follows while idle.
    wait_for(lambda: metric(get_metrics(pd["p2"].base_url), "kvserve:kv_transfer_exports_held") == 0,
             what="no export held by the prefill instance")
