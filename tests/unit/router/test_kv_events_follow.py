"""The router follows a real engine's KV events: after a workload with evictions, the router's
index of the instance equals the engine's prefix cache, block hash for block hash.

The instance is the real /kv_events route over a KVEventLog fed by a real LLMEngine (tiny random
model, a KV pool small enough to evict); the router reaches it through httpx's ASGI transport, so
everything runs on one event loop (the engine steps between awaits).
"""
from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response

from kvserve.engine.llm_engine import LLMEngine
from kvserve.entrypoints.openai.kv_events import KVEventLog, add_kv_event_route
from kvserve.router.config import RouterConfig
from kvserve.router.service import Router
from kvserve.sampling_params import SamplingParams
from tests.helpers.tiny_models import build_tiny_model

URL = "http://instance-a:8000"
BS = 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model = build_tiny_model("llama-tied", tmp_path_factory.mktemp("tiny"))
    eng = LLMEngine(str(model), num_kv_blocks=20, block_size=BS, max_model_len=64, dtype="float32")
    eng.enable_kv_events()
    return eng


def _instance_app(log: KVEventLog) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(f'kvserve:instance_info{{role="both",block_size="{BS}"}} 1.0\n', media_type="text/plain")

    add_kv_event_route(app, log)
    return app


class _Switch:
    """An ASGI app forwarding to `app`, which the test may replace (a restarted instance)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def _generate(engine: LLMEngine, prompts: list[list[int]]) -> None:
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for p in prompts:
        engine.add_request({"prompt_token_ids": p}, params)
    while engine.has_unfinished_requests():
        engine.step()


async def _caught_up(router: Router, log: KVEventLog, timeout_s: float = 10.0) -> None:
    assert router.kv_subscriber is not None
    cur = router.kv_subscriber.cursors[URL]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not (cur.epoch == log.epoch and cur.seq == log.seq):
        assert asyncio.get_running_loop().time() < deadline, f"follower at {cur}, log at {log.seq}"
        await asyncio.sleep(0.01)


def test_router_index_equals_the_engine_cache(engine: LLMEngine) -> None:
    rng = random.Random(1)
    prefixes = [[rng.randrange(500) for _ in range(12)] for _ in range(4)]

    async def main() -> None:
        log = KVEventLog(BS)
        config = RouterConfig(instances=(URL,), policy="kv-aware", block_size=BS, health_interval_s=0.1,
                              kv_events_wait_s=0.2)
        switch = _Switch(_instance_app(log))
        router = Router(config, transport=httpx.ASGITransport(app=switch))
        pool = engine.core.kv_manager.pool
        async with router.lifespan():
            for _ in range(6):
                batch = [rng.choice(prefixes) + [rng.randrange(500) for _ in range(rng.randrange(1, 20))]
                         for _ in range(3)]
                _generate(engine, batch)
                log.append(engine.take_kv_events())
                await _caught_up(router, log)
                assert router.kv_index.reported(URL) == set(pool.cached)
                router.kv_index.check_integrity()
            assert pool.num_evictions > 0, "the workload must evict blocks"
            assert router.kv_index.num_blocks(URL) == len(pool.cached)
            # The instance restarts (a new epoch) with an empty cache: the follower resyncs.
            assert engine.core.reset_prefix_cache()
            restarted = KVEventLog(BS)
            switch.app = _instance_app(restarted)
            restarted.append(engine.take_kv_events())
            _generate(engine, [prefixes[0] + [1, 2, 3]])
            restarted.append(engine.take_kv_events())
            await _caught_up(router, restarted)
            assert router.kv_index.reported(URL) == set(pool.cached) and len(pool.cached) == 4  # 15 + 3 tokens

    asyncio.run(main())


def test_unhealthy_instance_is_cleared_then_resynced_by_snapshot(engine: LLMEngine) -> None:
    async def main() -> None:
        log = KVEventLog(BS)
        log.append([("stored", [bytes([7]) * 32, bytes([8]) * 32])])
        config = RouterConfig(instances=(URL,), policy="kv-aware", block_size=BS, health_interval_s=0.1,
                              kv_events_wait_s=0.2)
        router = Router(config, transport=httpx.ASGITransport(app=_instance_app(log)))
        async with router.lifespan():
            await _caught_up(router, log)
            assert len(router.kv_index.reported(URL)) == 2
            inst = router.pool.get(URL)
            assert inst is not None
            router.pool.mark_failed(inst, "test")  # removed: its entries go, its cursor resets
            assert router.kv_index.num_blocks(URL) == 0
            cur = router.kv_subscriber.cursors[URL]  # type: ignore[union-attr]
            assert cur.seq is None
            log.append([("removed", [bytes([7]) * 32])])
            await asyncio.sleep(0.5)  # the health check re-admits it; the follower takes a snapshot
            await _caught_up(router, log)
            assert router.kv_index.reported(URL) == {bytes([8]) * 32}

    asyncio.run(main())


def test_a_server_without_kv_events_is_left_alone() -> None:
    async def main() -> None:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        config = RouterConfig(instances=(URL,), policy="kv-aware", block_size=BS, health_interval_s=0.1)
        router = Router(config, transport=httpx.ASGITransport(app=app))
        async with router.lifespan():
            await asyncio.sleep(0.3)
            cur = router.kv_subscriber.cursors[URL]  # type: ignore[union-attr]
            assert cur.supported is False and cur.answers == 0

    asyncio.run(main())
