"""Prefill/decode pairing and the transfer-parameter relay, on simulated instances (MockTransport)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from kvserve.entrypoints.openai.errors import OpenAIError
from kvserve.router.instances import Instance, InstancePool
from kvserve.router.metrics import RouterMetrics
from kvserve.router.pd import PDRouter, TransferParamsMissing, TransferParamsRelay
from kvserve.router.policies import PolicyContext, RoundRobinPolicy
from kvserve.router.prompts import RouteRequest
from kvserve.router.proxy import Forwarder
from kvserve.router.scrape import InstanceStats
from tests.unit.router.test_proxy import answer

P, D = "http://p:1", "http://d:2"


def test_relay_bodies() -> None:
    relay = TransferParamsRelay()
    body = {"prompt": "x", "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True}, "n": 1}
    pre = relay.prefill_request(body)
    assert pre == {"prompt": "x", "max_tokens": 1, "stream": False, "n": 1,
                   "kv_transfer_params": {"do_remote_decode": True}}
    assert body["max_tokens"] == 50  # the original is left as it was
    assert relay.prefill_request({"messages": [], "max_completion_tokens": 9})["max_completion_tokens"] == 1
    dec = relay.decode_request(body, {"kv_transfer_params": {"remote_block_ids": [3]}})
    assert dec == {**body, "kv_transfer_params": {"remote_block_ids": [3]}}
    for bad in ({}, {"kv_transfer_params": None}, {"kv_transfer_params": {}}, []):
        with pytest.raises(TransferParamsMissing):
            relay.decode_request(body, bad)  # type: ignore[arg-type]


def pd_setup(handler: Any, roles: tuple[str | None, str | None] = ("prefill", "decode")) -> tuple[PDRouter, RouterMetrics]:
    pool = InstancePool([Instance(P, "prefill", healthy=True, checked=True, stats=InstanceStats(role=roles[0])),
                         Instance(D, "decode", healthy=True, checked=True, stats=InstanceStats(role=roles[1]))])
    metrics = RouterMetrics(pool.instances)
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    fwd = {s: Forwarder(pool, RoundRobinPolicy(PolicyContext()), client, metrics, 16) for s in ("prefill", "decode")}
    return PDRouter(fwd["prefill"], fwd["decode"], metrics), metrics


def outcome(m: RouterMetrics, name: str) -> float:
    return m.registry.get_sample_value("kvserve:router_pd_requests_total", {"outcome": name}) or 0.0


def test_prefill_then_decode_with_the_relayed_params() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        body = json.loads(req.content)
        seen.append((req.url.host, body))
        if req.url.host == "p":
            return answer(200, {"choices": [{"text": "A"}], "kv_transfer_params": {"engine": "p", "blocks": [7]}})
        return answer(200, {"choices": [{"text": "ABC"}]})

    pd, m = pd_setup(handler)
    resp = asyncio.run(pd.handle("/v1/completions", {"prompt": "q", "max_tokens": 3}, {}, RouteRequest()))
    assert resp.status_code == 200 and json.loads(resp.body) == {"choices": [{"text": "ABC"}]}
    assert [h for h, _ in seen] == ["p", "d"]
    assert seen[0][1]["max_tokens"] == 1 and seen[0][1]["kv_transfer_params"] == {"do_remote_decode": True}
    assert seen[1][1] == {"prompt": "q", "max_tokens": 3, "kv_transfer_params": {"engine": "p", "blocks": [7]}}
    assert outcome(m, "ok") == 1


def test_a_prefill_answer_without_params_is_a_502_never_a_local_recompute() -> None:
    hosts: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        hosts.append(req.url.host)
        return answer(200, {"choices": [{"text": "A"}]})

    pd, m = pd_setup(handler)
    with pytest.raises(OpenAIError) as err:
        asyncio.run(pd.handle("/v1/completions", {"prompt": "q"}, {}, RouteRequest()))
    assert err.value.status == 502 and err.value.code == "kv_transfer_failed"
    assert hosts == ["p"]  # the decode instance was never asked
    assert outcome(m, "no_transfer_params") == 1


def test_prefill_client_error_is_passed_through() -> None:
    pd, m = pd_setup(lambda req: answer(400, {"error": {"message": "bad prompt"}}))
    resp = asyncio.run(pd.handle("/v1/completions", {"prompt": ""}, {}, RouteRequest()))
    assert resp.status_code == 400 and outcome(m, "prefill_failed") == 1


@pytest.mark.parametrize("roles", [(None, None), ("both", "decode"), ("prefill", "both")])
def test_no_pair_without_reported_roles(roles: tuple[str | None, str | None]) -> None:
    hosts: list[str] = []
    pd, m = pd_setup(lambda req: hosts.append(req.url.host) or answer(200, {}), roles)
    with pytest.raises(OpenAIError) as err:
        asyncio.run(pd.handle("/v1/completions", {"prompt": "q"}, {}, RouteRequest()))
    assert err.value.status == 503 and "reports role" in err.value.message
    assert hosts == [] and outcome(m, "no_pair") == 1
