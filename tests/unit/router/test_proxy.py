"""Forwarding and retries, on instances simulated by an httpx MockTransport (no sockets)."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

import httpx
import pytest

from kvserve.entrypoints.openai.errors import OpenAIError
from kvserve.router.instances import Instance, InstancePool
from kvserve.router.metrics import RouterMetrics
from kvserve.router.policies import PolicyContext, RoundRobinPolicy
from kvserve.router.prompts import RouteRequest
from kvserve.router.proxy import INSTANCE_HEADER, Buffered, Forwarder

A, B = "http://a:1", "http://b:2"
SSE = {"content-type": "text/event-stream"}


class Chunks(httpx.AsyncByteStream):
    """A response body that yields `chunks` and then raises `error` (a dropped connection)."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c
        if self.error is not None:
            raise self.error


def setup(handler: Callable[[httpx.Request], Any], max_attempts: int = 3,
          urls: tuple[str, ...] = (A, B)) -> tuple[Forwarder, InstancePool, RouterMetrics]:
    pool = InstancePool([Instance(u, healthy=True, checked=True) for u in urls])
    metrics = RouterMetrics(pool.instances)
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return Forwarder(pool, RoundRobinPolicy(PolicyContext()), client, metrics, 16, max_attempts), pool, metrics


def answer(status: int, obj: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    """A JSON answer delivered as a network stream (as a real connection delivers it)."""
    return httpx.Response(status, headers={"content-type": "application/json", **(headers or {})},
                          stream=Chunks([json.dumps(obj).encode()]))


def value(metrics: RouterMetrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def send(fwd: Forwarder, **kw: Any) -> Any:
    return asyncio.run(fwd.send("any", "POST", "/v1/completions", b'{"prompt": "x"}', {}, RouteRequest(), **kw))


async def body_of(response: Any) -> bytes:
    return b"".join([c async for c in response.body_iterator])


def test_connect_error_is_retried_elsewhere_and_removes_the_instance() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "a":
            raise httpx.ConnectError("refused")
        return answer(200, {"ok": "b"})

    fwd, pool, m = setup(handler)
    resp = send(fwd)
    assert resp.status_code == 200 and json.loads(resp.body) == {"ok": "b"} and resp.headers[INSTANCE_HEADER] == B
    a, b = pool.instances
    assert not a.healthy and "refused" in (a.last_error or "") and b.healthy
    assert value(m, "kvserve:router_failed_attempts_total", instance=A, reason="connect") == 1
    assert value(m, "kvserve:router_retries_total", instance=B) == 1
    assert value(m, "kvserve:router_requests_total", instance=B) == 1
    assert (a.inflight, b.inflight, a.pending_blocks, b.pending_blocks) == (0, 0, 0, 0)
    assert pool.routable() == [b]  # later requests skip a until a health check re-admits it


def test_pending_blocks_are_charged_while_the_prompt_is_computed() -> None:
    seen: list[int] = []
    parts = [b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"]

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(pool.instances[0].pending_blocks)  # while the instance works on it
        return httpx.Response(200, headers=SSE, stream=Chunks(parts))

    fwd, pool, _ = setup(handler, urls=(A,))
    route = RouteRequest("/v1/completions", 70, [])  # 5 blocks of 16, none predicted cached

    async def run() -> None:
        resp = await fwd.send("any", "POST", "/v1/completions", b"{}", {}, route)
        a = pool.instances[0]
        assert (a.inflight, a.pending_blocks) == (1, 0)  # first token out: the prefill is done
        await body_of(resp)

    asyncio.run(run())
    assert seen == [5]


def test_5xx_is_retried_but_keeps_the_instance_and_the_last_5xx_is_passed_on() -> None:
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.url.host)
        return answer(503, {"error": {"message": f"{req.url.host} busy"}}, {"retry-after": "3"})

    fwd, pool, m = setup(handler)
    resp = send(fwd)
    assert seen == ["a", "b"]  # each instance once, not max_attempts times the same one
    assert resp.status_code == 503 and json.loads(resp.body)["error"]["message"] == "b busy"
    assert resp.headers["retry-after"] == "3"
    assert all(i.healthy for i in pool)
    assert value(m, "kvserve:router_failed_attempts_total", instance=A, reason="status") == 1


def test_a_connection_lost_before_the_headers_is_retried_without_removing_the_instance() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "a":
            raise httpx.ReadError("keep-alive connection closed by the instance")
        return answer(200, {"ok": "b"})

    fwd, pool, m = setup(handler)
    assert send(fwd).headers[INSTANCE_HEADER] == B
    assert pool.instances[0].healthy
    assert value(m, "kvserve:router_failed_attempts_total", instance=A, reason="read") == 1


def test_4xx_is_the_clients_error_and_is_not_retried() -> None:
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.url.host)
        return answer(400, {"error": {"message": "bad"}})

    fwd, _, _ = setup(handler)
    assert send(fwd).status_code == 400 and seen == ["a"]


def test_no_healthy_instance_is_a_503_naming_each_instance_state() -> None:
    fwd, pool, m = setup(lambda r: answer(200, {}))
    pool.instances[0].healthy = False
    pool.instances[0].last_error = "/health answered 500"
    pool.instances[1].checked = False
    pool.instances[1].healthy = False
    with pytest.raises(OpenAIError) as err:
        send(fwd)
    e = err.value
    assert e.status == 503 and e.code == "no_healthy_instance" and e.type == "service_unavailable"
    assert "0 of 2 routable" in e.message and "/health answered 500" in e.message and "not checked yet" in e.message
    assert e.headers == {"Retry-After": "1"}
    assert value(m, "kvserve:router_no_instance_total", reason="none_healthy") == 1


def test_max_attempts_bounds_the_retries() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    fwd, pool, m = setup(handler, max_attempts=1)
    with pytest.raises(OpenAIError) as err:
        send(fwd)
    assert err.value.code == "all_instances_failed" and A in err.value.message and B not in err.value.message
    assert pool.instances[1].healthy


def test_read_timeout_is_a_504_and_not_retried() -> None:
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.url.host)
        raise httpx.ReadTimeout("slow")

    fwd, pool, _ = setup(handler)
    with pytest.raises(OpenAIError) as err:
        send(fwd)
    assert err.value.status == 504 and seen == ["a"] and pool.instances[0].healthy


def test_stream_passes_through_byte_for_byte() -> None:
    parts = [b'data: {"a": 1}\n\n', b'data: {"a"', b': 2}\n\ndata: [DONE]\n\n']
    fwd, pool, _ = setup(lambda r: httpx.Response(200, headers={**SSE, "x-request-id": "r1"}, stream=Chunks(parts)))

    async def run() -> tuple[Any, bytes]:
        resp = await fwd.send("any", "POST", "/v1/completions", b"{}", {}, RouteRequest())
        assert pool.instances[0].inflight == 1  # held until the stream ends
        return resp, await body_of(resp)

    resp, body = asyncio.run(run())
    assert body == b"".join(parts)
    assert resp.headers["x-request-id"] == "r1" and resp.headers[INSTANCE_HEADER] == A


def test_stream_dropped_before_its_first_byte_is_retried() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "a":
            return httpx.Response(200, headers=SSE, stream=Chunks([], httpx.RemoteProtocolError("peer closed")))
        return httpx.Response(200, headers=SSE, stream=Chunks([b"data: [DONE]\n\n"]))

    fwd, pool, m = setup(handler)

    async def run() -> bytes:
        resp = await fwd.send("any", "POST", "/v1/completions", b"{}", {}, RouteRequest())
        return await body_of(resp)

    assert asyncio.run(run()) == b"data: [DONE]\n\n"
    assert value(m, "kvserve:router_failed_attempts_total", instance=A, reason="read") == 1
    assert pool.instances[0].healthy  # connected, then lost: the health check decides, not one request


def test_stream_cut_after_the_first_byte_ends_with_an_error_event_and_done() -> None:
    cut = Chunks([b'data: {"a": 1}\n\n', b'data: {"a'], httpx.ReadError("reset"))
    fwd, _, m = setup(lambda r: httpx.Response(200, headers=SSE, stream=cut))

    async def run() -> bytes:
        resp = await fwd.send("any", "POST", "/v1/completions", b"{}", {}, RouteRequest())
        return await body_of(resp)

    body = asyncio.run(run())
    head, partial, error, done = body.split(b"\n\n")[:4]
    assert head == b'data: {"a": 1}' and partial == b'data: {"a'  # the partial event is closed off
    event = json.loads(error[len(b"data: "):])
    assert event["error"]["code"] == "upstream_stream_error" and A in event["error"]["message"]
    assert done == b"data: [DONE]"
    assert value(m, "kvserve:router_stream_errors_total", instance=A) == 1


def test_buffer_mode_returns_the_whole_answer() -> None:
    fwd, _, _ = setup(lambda r: answer(200, {"x": 1}))
    whole = send(fwd, buffer=True)
    assert isinstance(whole, Buffered) and whole.status == 200 and json.loads(whole.body) == {"x": 1}
