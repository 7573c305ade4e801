"""The server's engine process writes its device KV blocks to a persistent tier when it
shuts down (issue 12, item 2): `AsyncEngine.shutdown()` is what `kvserve serve` runs on
SIGTERM after draining; the engine process then closes its engine."""
from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from kvserve.engine.async_engine import AsyncEngine
from kvserve.engine.engine_ipc import AddRequest
from kvserve.engine.engine_process import EngineProcessConfig
from kvserve.sampling_params import SamplingParams
from tests.helpers.tiny_models import build_tiny_model

TOKENS, BLOCK_SIZE = 200, 4


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama3", tmp_path_factory.mktemp("shutdown_model"), seed=7)


async def serve_one_and_shut_down(model: Path, tiers: str, policy: str) -> None:
    engine = AsyncEngine(EngineProcessConfig(engine_kwargs=dict(
        model=str(model), kv_tiers=tiers, kv_offload_policy=policy, block_size=BLOCK_SIZE,
        num_kv_blocks=256, max_model_len=512)))
    await engine.start()
    try:
        rng = random.Random(0)
        ids = [rng.randrange(512) for _ in range(TOKENS)]
        stream = engine.add_requests([AddRequest("r", ids, SamplingParams(max_tokens=2, temperature=0))])
        async for _ in stream:
            pass
    finally:
        await engine.shutdown()


def test_engine_process_flushes_device_blocks_on_shutdown(model: Path, tmp_path: Path) -> None:
    # "evict" and a pool that never fills: only the flush on shutdown can write the blocks.
    asyncio.run(serve_one_and_shut_down(model, f"disk:{tmp_path}:64MiB", "evict"))
    assert len(list(tmp_path.rglob("*.kvb"))) == TOKENS // BLOCK_SIZE
