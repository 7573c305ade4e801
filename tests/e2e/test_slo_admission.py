"""Scheduling fields over HTTP, 429 admission control and preemption metrics: a server started
with the slo policy, rejection and swap preemption; ServerContext.submit on a fake engine
for the KV and queue limits."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import pytest

from kvserve.engine.engine_ipc import AddRequest, EngineInfo, EngineStatsSnapshot, RequestDelta
from kvserve.entrypoints.openai.errors import OpenAIError
from kvserve.entrypoints.openai.protocol import CompletionRequest
from kvserve.entrypoints.openai.scheduling import (
    RequestScheduling,
    SchedulingDefaults,
    parse_tenant_slo,
    request_scheduling,
)
from kvserve.entrypoints.openai.serving import ServerContext, raise_for_delta
from kvserve.metrics import ServerMetrics
from kvserve.request import SLO
from kvserve.sampling_params import SamplingParams
from tests.e2e.harness import ServerProcess, get_metrics, metric

BODY = {"model": "tiny", "prompt": [100, 101, 102], "max_tokens": 4, "temperature": 0.0}


@pytest.fixture(scope="module")
def slo_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # 12 blocks of 16 tokens: a few concurrent 100-token requests must preempt.
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("slo") / "server.log", "--served-model-name", "tiny",
                        "--scheduling-policy", "slo", "--slo-reject", "--preemption-mode", "swap",
                        "--swap-space", "0.01", "--num-kv-blocks", "12", "--max-num-seqs", "4",
                        "--tenant-default-slo", "slowpoke=0.001")
    srv.wait_ready()
    yield srv
    srv.stop()


def test_scheduling_fields_are_accepted_and_validated(slo_server: ServerProcess) -> None:
    url = slo_server.base_url + "/v1/completions"
    ok = dict(BODY, priority=-3, tenant="a", user="u", slo_ttft_ms=60000, slo_tpot_ms=5000)
    assert httpx.post(url, json=ok, timeout=60).status_code == 200
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "b",
            "slo_ttft_ms": 60000}
    assert httpx.post(slo_server.base_url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
    for bad in ({"slo_ttft_ms": 0}, {"slo_tpot_ms": -1}, {"priority": "high"}, {"tenant": 3}):
        resp = httpx.post(url, json=dict(BODY, **bad), timeout=60)
        assert resp.status_code == 400, bad
        assert resp.json()["error"]["param"] == next(iter(bad)), resp.json()


def test_unattainable_ttft_gets_429_with_retry_after(slo_server: ServerProcess) -> None:
    url = slo_server.base_url + "/v1/completions"
    # 1 microsecond: no prefill estimate can meet it.
    resp = httpx.post(url, json=dict(BODY, slo_ttft_ms=0.001), timeout=60)
    assert resp.status_code == 429
    assert int(resp.headers["retry-after"]) >= 1
    err = resp.json()["error"]
    assert err["code"] == "slo_unattainable" and "time-to-first-token" in err["message"]
    # The tenant default applies to a request without its own targets, and its own override it.
    assert httpx.post(url, json=dict(BODY, user="slowpoke"), timeout=60).status_code == 429
    assert httpx.post(url, json=dict(BODY, user="slowpoke", slo_ttft_ms=60000), timeout=60).status_code == 200


def test_preemptions_by_swap_are_counted(slo_server: ServerProcess) -> None:
    url = slo_server.base_url + "/v1/completions"
    # Four prompts in one call reach the engine together: 4 x 8 blocks at the end, 12 blocks.
    prompts = [[t + i for t in range(200, 260)] for i in range(4)]
    resp = httpx.post(url, json=dict(BODY, prompt=prompts, max_tokens=60, ignore_eos=True), timeout=120)
    assert resp.status_code == 200
    assert [c["index"] for c in resp.json()["choices"]] == [0, 1, 2, 3]
    assert resp.json()["usage"]["completion_tokens"] == 240
    m = get_metrics(slo_server.base_url)
    swapped = metric(m, "kvserve:preemptions_total", cause="kv_blocks", mode="swap")
    assert swapped == metric(m, "vllm:num_preemptions_total") > 0


class _FakeEngine:
    """What ServerContext.submit reads of the engine handle."""

    def __init__(self, usage: float, waiting: int) -> None:
        self.stats = EngineStatsSnapshot(num_waiting=waiting, kv_cache_usage=usage)
        self.num_queued = waiting
        self.dead_reason = None
        self.added: list[AddRequest] = []

    def is_healthy(self) -> bool:
        return True

    def add_requests(self, requests: list[AddRequest]) -> object:
        self.added.extend(requests)
        return object()


def _ctx(engine: _FakeEngine, **kw: object) -> ServerContext:
    info = EngineInfo("m", 64, 512, 12, 16, 1)
    return ServerContext(engine=engine, info=info, tokenizer=None, served_model_names=["m"],  # type: ignore[arg-type]
                         metrics=ServerMetrics("m"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("usage, waiting, refused", [(0.9, 1, True), (0.9, 0, False), (0.3, 5, False)])
def test_kv_limit_refuses_with_429_only_when_full_and_requests_wait(usage: float, waiting: int,
                                                                   refused: bool) -> None:
    engine = _FakeEngine(usage, waiting)
    ctx = _ctx(engine, admission_kv_limit=0.8)
    sched = RequestScheduling(priority=2, tenant="acme", slo=SLO(ttft_s=1.0))
    if refused:
        with pytest.raises(OpenAIError) as info:
            ctx.submit([[1, 2]], SamplingParams(), "cmpl-x", 0.0, sched)
        err = info.value
        assert (err.status, err.code, err.headers) == (429, "kv_cache_full", {"Retry-After": "1"})
        assert engine.added == []
    else:
        ctx.submit([[1, 2]], SamplingParams(), "cmpl-x", 0.0, sched)
        (added,) = engine.added
        assert (added.priority, added.tenant, added.slo) == (2, "acme", SLO(ttft_s=1.0))


def test_queue_limit_is_a_429() -> None:
    ctx = _ctx(_FakeEngine(0.0, 3), max_queue_len=3)
    with pytest.raises(OpenAIError) as info:
        ctx.submit([[1]], SamplingParams(), "cmpl-y", 0.0)
    assert (info.value.status, info.value.code) == (429, "queue_full")


def test_rejection_delta_maps_to_429_and_tenant_defaults() -> None:
    with pytest.raises(OpenAIError) as info:
        raise_for_delta(RequestDelta("r", finished=True, error="no", rejected=True, retry_after_s=2.2))
    assert (info.value.status, info.value.headers) == (429, {"Retry-After": "3"})
    with pytest.raises(OpenAIError) as info:
        raise_for_delta(RequestDelta("r", finished=True, error="bad prompt", rejected=True))
    assert info.value.status == 400
    defaults = SchedulingDefaults(parse_tenant_slo("chat=1000/100,batch=20000"))
    assert defaults.tenant_slo == {"chat": SLO(1.0, 0.1), "batch": SLO(20.0, None)}
    req = CompletionRequest(prompt=[1], user="chat")
    assert request_scheduling(req, defaults) == RequestScheduling(0, "chat", SLO(1.0, 0.1))
    req = CompletionRequest(prompt=[1], user="chat", tenant="batch", slo_tpot_ms=50.0, priority=1)
    assert request_scheduling(req, defaults) == RequestScheduling(1, "batch", SLO(None, 0.05))
    for bad in ("chat", "chat=", "=5", "chat=x/1"):
        with pytest.raises(ValueError):
            parse_tenant_slo(bad)
