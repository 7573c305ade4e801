"""`kvserve router` over loopback in front of two small fake OpenAI backends (tests/unit/router/fake_backend.py).

Router and backends are real uvicorn servers on ephemeral ports; clients are httpx and the real
`openai` client.  Each test gets fresh backends and a fresh router.
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterator

import httpx
import openai
import pytest

from kvserve.router.app import build_app
from kvserve.router.config import RouterConfig
from kvserve.router.service import Router
from tests.unit.router.fake_backend import BackendState, ThreadServer, make_app

HEADER = "x-kvserve-instance"


class Setup:
    def __init__(self, roles: tuple[str | None, str | None] = (None, None), **config: Any) -> None:
        self.states = [BackendState("a", role=roles[0]), BackendState("b", role=roles[1])]
        self.backends = [ThreadServer(make_app(s)).start() for s in self.states]
        urls = [b.url for b in self.backends]
        if roles[0] in ("prefill", "decode") or config.pop("pd", False):
            cfg = RouterConfig(prefill=(urls[0],), decode=(urls[1],), **config)
        else:
            cfg = RouterConfig(instances=tuple(urls), **config)
        self.router = Router(cfg)
        self.server = ThreadServer(build_app(self.router), lifespan="on").start()
        self.url = self.server.url

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="k", max_retries=0, timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        return self.router.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.server.stop(force=False)
        for b in self.backends:
            b.stop()


@pytest.fixture
def setup() -> Iterator[Setup]:
    s = Setup(health_interval_s=30.0)  # no periodic check during the test: removals come from requests
    yield s
    s.close()


def wait_until(pred: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_pass_through_is_byte_identical_to_the_instance(setup: Setup) -> None:
    for path, body in (("/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 3}),
                       ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2})):
        for stream in (False, True):
            sent = {**body, "stream": stream}
            via = httpx.post(setup.url + path, json=sent, timeout=10)
            direct = httpx.post(via.headers[HEADER] + path, json=sent, timeout=10)
            assert via.status_code == direct.status_code == 200
            assert via.content == direct.content
            assert via.headers["content-type"] == direct.headers["content-type"]
    # The instances got exactly the bodies that were sent (and round-robin alternated).
    a, b = setup.states
    assert a.requests[0] == ("/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 3, "stream": False})
    assert len(a.requests) + len(b.requests) == 8 and len(a.requests) == len(b.requests)


def test_openai_client_streams_through_the_router(setup: Setup) -> None:
    client = setup.client()
    full = client.completions.create(model="fake", prompt="x", max_tokens=3)
    chunks = list(client.completions.create(model="fake", prompt="x", max_tokens=3, stream=True))
    assert full.choices[0].text == " a-0 a-1 a-2"  # round-robin: a, then b
    assert "".join(c.choices[0].text for c in chunks) == " b-0 b-1 b-2"
    chat = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "q"}], max_tokens=2)
    assert chat.choices[0].message.content == " a-0 a-1"
    assert [m.id for m in client.models.list().data] == ["fake"]


def test_a_killed_instance_is_retried_elsewhere_then_readmitted(setup: Setup) -> None:
    a_srv = setup.backends[0]
    a_srv.stop()
    client = setup.client()
    for _ in range(3):
        assert client.completions.create(model="fake", prompt="x", max_tokens=1).choices[0].text == " b-0"
    a_url = a_srv.url
    assert setup.metric("kvserve:router_failed_attempts_total", instance=a_url, reason="connect") == 1
    assert setup.metric("kvserve:router_retries_total", instance=setup.backends[1].url) == 1
    inst = {i["url"]: i for i in httpx.get(setup.url + "/router/instances").json()["instances"]}
    assert not inst[a_url]["healthy"] and "ConnectError" in inst[a_url]["last_error"]
    a_srv.start()  # back on the same port; the next health check re-admits it
    import asyncio

    asyncio.run_coroutine_threadsafe(setup.router.health.check_once(), _loop(setup)).result(10)  # type: ignore[union-attr]
    texts = {client.completions.create(model="fake", prompt="x", max_tokens=1).choices[0].text for _ in range(2)}
    assert texts == {" a-0", " b-0"}


def _loop(setup: Setup) -> Any:
    """The router's event loop (it runs in the server thread)."""
    return setup.router.health._task.get_loop()  # type: ignore[union-attr]


def test_all_instances_down_is_a_503_openai_error(setup: Setup) -> None:
    for b in setup.backends:
        b.stop()
    client = setup.client()
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="fake", prompt="x", max_tokens=1)
    assert err.value.status_code == 503
    body = err.value.response.json()["error"]
    assert body["type"] == "service_unavailable" and body["code"] == "all_instances_failed"
    # Both are now removed: the next request fails fast, naming each instance's state.
    r = httpx.post(setup.url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_instance"
    assert "0 of 2 routable" in r.json()["error"]["message"] and r.headers["retry-after"] == "1"
    assert httpx.get(setup.url + "/health").status_code == 503
    assert setup.metric("kvserve:router_no_instance_total", reason="none_healthy") == 1


def test_5xx_is_retried_on_the_other_instance(setup: Setup) -> None:
    setup.states[0].fail_status = 500
    r = httpx.post(setup.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 200 and r.headers[HEADER] == setup.backends[1].url
    assert setup.states[0].paths() == ["/v1/completions"]
    assert setup.metric("kvserve:router_failed_attempts_total", instance=setup.backends[0].url, reason="status") == 1


def test_a_stream_cut_mid_way_ends_with_an_error_event(setup: Setup) -> None:
    setup.states[0].cut_after = 1
    r = httpx.post(setup.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert json.loads(events[0][6:])["choices"][0]["text"] == " a-0"
    assert json.loads(events[1][6:])["error"]["code"] == "upstream_stream_error"
    assert events[2] == "data: [DONE]" and len(events) == 3
    setup.states[1].cut_after = 1  # round-robin: the next stream goes to b
    with pytest.raises(openai.APIError):  # the openai client raises on the error event
        list(setup.client().completions.create(model="fake", prompt="x", max_tokens=3, stream=True))


def test_a_client_that_leaves_early_abandons_the_instances_stream(setup: Setup) -> None:
    a = setup.states[0]
    a.first_delay_s = 5.0  # a slow prefill: the router is still waiting for the first byte
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(setup.url + "/v1/completions", json={"prompt": "x", "stream": True}, timeout=0.5)
    wait_until(lambda: a.streams_abandoned == 1, timeout_s=2.5)  # well before the 5 s prefill ends
    wait_until(lambda: setup.router.pool.instances[0].inflight == 0, timeout_s=2)
    a.first_delay_s = 0.0
    for st in setup.states:  # and after the first byte (round-robin: this one goes to b)
        st.chunk_delay_s = 0.5
    with httpx.stream("POST", setup.url + "/v1/completions", json={"prompt": "x", "stream": True,
                                                                    "max_tokens": 5}) as r:
        next(r.iter_raw())
    wait_until(lambda: setup.states[1].streams_abandoned == 1, timeout_s=2)  # before its 2.5 s of chunks end


def test_health_checks_remove_and_readmit() -> None:
    s = Setup(health_interval_s=0.05, unhealthy_after=1)
    try:
        s.states[0].health_status = 503
        wait_until(lambda: not s.router.pool.instances[0].healthy)
        hosts = {httpx.post(s.url + "/v1/completions", json={"prompt": "x"}).headers[HEADER] for _ in range(3)}
        assert hosts == {s.backends[1].url}
        assert s.metric("kvserve:router_instance_transitions_total", instance=s.backends[0].url, to="unhealthy") == 1
        s.states[0].health_status = 200
        wait_until(lambda: s.router.pool.instances[0].healthy)
        hosts = {httpx.post(s.url + "/v1/completions", json={"prompt": "x"}).headers[HEADER] for _ in range(4)}
        assert hosts == {s.backends[0].url, s.backends[1].url}
        metrics = httpx.get(s.url + "/metrics").text
        assert f'kvserve:router_instance_healthy{{instance="{s.backends[0].url}",slot="any"}} 1.0' in metrics
    finally:
        s.close()


def test_least_load_avoids_the_busy_instance() -> None:
    s = Setup(policy="least-load", health_interval_s=0.05)
    try:
        s.states[0].running, s.states[0].waiting = 4, 2
        wait_until(lambda: s.router.pool.instances[0].load() == 6)
        hosts = [httpx.post(s.url + "/v1/completions", json={"prompt": "x"}).headers[HEADER] for _ in range(3)]
        assert hosts == [s.backends[1].url] * 3
    finally:
        s.close()


def test_kv_aware_follows_the_prefix_and_counts_predicted_hits() -> None:
    s = Setup(policy="kv-aware", health_interval_s=30.0)  # token-id prompts: no tokenizer needed
    try:
        prefix = list(range(100, 164))  # 4 blocks of 16
        hosts = [httpx.post(s.url + "/v1/completions", json={"prompt": prefix + [i] * 5}).headers[HEADER]
                 for i in range(4)]
        other = httpx.post(s.url + "/v1/completions", json={"prompt": list(range(500, 600))}).headers[HEADER]
        assert len(set(hosts)) == 1 and other != hosts[0]  # a new prefix goes to the emptier cache
        assert s.metric("kvserve:router_kv_prompt_tokens_total", instance=hosts[0]) == 4 * 69
        assert s.metric("kvserve:router_kv_predicted_hit_tokens_total", instance=hosts[0]) == 3 * 64
        assert s.metric("kvserve:router_kv_predicted_hit_rate") == 3 * 64 / (4 * 69 + 100)
        inst = {i["url"]: i for i in httpx.get(s.url + "/router/instances").json()["instances"]}
        assert inst[hosts[0]]["kv_index_blocks"] == 4 and inst[other]["kv_index_blocks"] == 6
    finally:
        s.close()


def test_kv_events_endpoint(setup: Setup) -> None:
    a = setup.backends[0].url
    batch = {"instance": a, "seq": 0, "events": [{"type": "stored", "block_hashes": ["ab" * 32, "cd" * 32]}]}
    r = httpx.post(setup.url + "/router/kv_events", json=batch)
    assert r.status_code == 200 and r.json() == {"stored": 2, "removed": 0, "cleared": 0, "gap": False}
    inst = {i["url"]: i for i in httpx.get(setup.url + "/router/instances").json()["instances"]}
    assert inst[a]["kv_index_blocks"] == 2
    bad = httpx.post(setup.url + "/router/kv_events", json={"instance": a, "events": [{"type": "stored"}]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_kv_events"
    assert setup.metric("kvserve:router_kv_events_total", type="stored") == 2


def test_request_body_limit(setup: Setup) -> None:
    r = httpx.post(setup.url + "/v1/completions", content=b"x" * (4 * 2**20 + 1),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert setup.states[0].requests == [] and setup.states[1].requests == []


def test_prefill_decode_relay_through_instances_that_report_roles() -> None:
    s = Setup(roles=("prefill", "decode"), health_interval_s=30.0)
    try:
        client = s.client()
        out = client.completions.create(model="fake", prompt="x", max_tokens=3)
        assert out.choices[0].text == " b-0 b-1 b-2"  # the decode instance's answer
        pre_path, pre_body = s.states[0].requests[0]
        assert pre_body["max_tokens"] == 1 and pre_body["kv_transfer_params"] == {"do_remote_decode": True}
        _, dec_body = s.states[1].requests[0]
        assert dec_body["kv_transfer_params"] == {"remote_engine": "a", "blocks": [1, 2]}
        chunks = list(client.completions.create(model="fake", prompt="x", max_tokens=2, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == " b-0 b-1"
        assert s.metric("kvserve:router_pd_requests_total", outcome="ok") == 2
        s.states[0].give_transfer_params = False
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="fake", prompt="x", max_tokens=3)
        assert err.value.status_code == 502 and len(s.states[1].requests) == 2  # decode not asked
    finally:
        s.close()


def test_prefill_decode_without_reported_roles_is_a_503() -> None:
    s = Setup(pd=True, health_interval_s=30.0)  # fake backends that report no role (as kvserve today)
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "reports role none, slot needs prefill" in r.json()["error"]["message"]
        assert s.states[0].requests == [] and s.states[1].requests == []
        assert httpx.get(s.url + "/health").status_code == 503
    finally:
        s.close()
