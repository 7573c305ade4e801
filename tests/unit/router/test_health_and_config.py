"""Health transitions (removal, re-admission, roles), the health checker, config and CLI validation."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from kvserve.router.config import RouterConfig
from kvserve.router.health import HealthChecker
from kvserve.router.instances import Instance, InstancePool, normalize_url
from kvserve.router.kv_index import KVIndex
from kvserve.router.metrics import RouterMetrics
from kvserve.router.scrape import InstanceStats


def test_transitions_need_consecutive_results() -> None:
    changes: list[tuple[str, bool]] = []
    a = Instance("http://a:1")
    pool = InstancePool([a], healthy_after=2, unhealthy_after=2)
    pool.listeners.append(lambda i, ok: changes.append((i.url, ok)))
    assert not a.routable and not a.checked
    pool.check_succeeded(a, None)
    assert not a.healthy  # 1 of 2 good checks
    pool.check_succeeded(a, InstanceStats(running=1))
    assert a.healthy and a.routable and changes == [("http://a:1", True)]
    pool.check_failed(a, "/health answered 500")
    assert a.healthy  # 1 of 2 bad checks
    pool.check_succeeded(a, None)
    pool.check_failed(a, "x")
    assert a.healthy  # the good check in between reset the count
    pool.check_failed(a, "/health answered 503")
    assert not a.healthy and a.last_error == "/health answered 503"
    assert changes[-1] == ("http://a:1", False)
    pool.mark_failed(a, "again")  # already out: no second transition
    assert len(changes) == 2


def test_mark_failed_removes_at_once_and_a_check_readmits() -> None:
    a = Instance("http://a:1", healthy=True, checked=True)
    pool = InstancePool([a], healthy_after=1, unhealthy_after=3)
    pool.mark_failed(a, "ConnectError")
    assert not a.healthy
    pool.check_succeeded(a, None)
    assert a.healthy and a.last_error is None


@pytest.mark.parametrize("slot,role,fits", [
    ("any", None, True), ("any", "both", True), ("any", "prefill", False),
    ("prefill", None, False), ("prefill", "both", False), ("prefill", "prefill", True),
    ("decode", "decode", True), ("decode", "prefill", False),
])
def test_roles_fit_slots(slot: str, role: str | None, fits: bool) -> None:
    inst = Instance("http://a:1", slot=slot, healthy=True, stats=InstanceStats(role=role))
    assert inst.role_fits is fits and inst.routable is fits


def test_health_checker_scrapes_and_clears_the_index_of_a_removed_instance() -> None:
    state = {"health": 200}
    metrics_text = 'vllm:num_requests_running{model_name="m"} 2\nvllm:num_requests_waiting{model_name="m"} 1\n'

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "b":
            raise httpx.ConnectError("refused")
        if req.url.path == "/health":
            return httpx.Response(state["health"])
        return httpx.Response(200, text=metrics_text)

    a, b = Instance("http://a:1"), Instance("http://b:2")
    pool = InstancePool([a, b], unhealthy_after=1)
    index = KVIndex()
    pool.listeners.append(lambda i, ok: None if ok else index.clear_instance(i.url))
    m = RouterMetrics(pool.instances, index)

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            checker = HealthChecker(pool, client, m, interval_s=1, timeout_s=1, kv_index=index)
            await checker.check_once()
            assert a.healthy and not b.healthy and b.checked and "refused" in (b.last_error or "")
            assert a.stats is not None and a.load() == 3
            index.record_routed(a.url, [b"\x01" * 32])
            state["health"] = 503
            await checker.check_once()
            assert not a.healthy and a.last_error == "/health answered 503"
            assert index.num_blocks(a.url) == 0
            assert checker.rounds == 2

    asyncio.run(run())
    assert m.registry.get_sample_value("kvserve:router_health_check_failures_total", {"instance": "http://b:2"}) == 2


def test_normalize_url() -> None:
    assert normalize_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    for bad in ("127.0.0.1:8000", "ftp://x:1", "http://x:1/v1", "http://x:99999", "http://x:1?a=b"):
        with pytest.raises(ValueError):
            normalize_url(bad)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "no instances"),
    ({"instances": ("http://a:1",), "prefill": ("http://b:1",), "decode": ("http://c:1",)}, "not both"),
    ({"prefill": ("http://b:1",)}, "at least one --prefill and one --decode"),
    ({"instances": ("http://a:1", "http://a:1/")}, "more than once"),
    ({"instances": ("http://a:1",), "policy": "random"}, "unknown --policy"),
    ({"instances": ("http://a:1",), "max_attempts": 0}, "max_attempts"),
    ({"instances": ("http://a:1",), "health_interval_s": 0}, "health_interval_s"),
])
def test_config_refuses(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kwargs)


def test_cli_reports_bad_options_with_exit_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    from kvserve.entrypoints.cli import main

    assert main(["router", "--instance", "http://a:1", "--policy", "kv-aware"]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err
    assert main(["router", "--prefill", "http://a:1"]) == 2
    assert "--decode" in capsys.readouterr().err
    assert main(["router", "--instance", "localhost:8000"]) == 2
    assert "http://HOST:PORT" in capsys.readouterr().err
