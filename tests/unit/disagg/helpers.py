"""Shared pieces of the disaggregation tests: engines on a tiny model, run to completion."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

from kvserve.engine.llm_engine import LLMEngine
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams

BLOCK = 8
ENGINE: dict[str, Any] = dict(block_size=BLOCK, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=64)


def prompt_set(seed: int = 0) -> list[list[int]]:
    """Prompts of several lengths (partial last blocks, exact multiples of the block, one block),
    two sharing a prefix (prefix-cache hits on both sides)."""
    rng = random.Random(seed)
    shared = [rng.randrange(512) for _ in range(3 * BLOCK)]
    out = [[rng.randrange(512) for _ in range(n)] for n in (5, BLOCK, 2 * BLOCK + 3, 4 * BLOCK, 41)]
    out += [shared + [rng.randrange(512) for _ in range(7)], shared + [rng.randrange(512) for _ in range(BLOCK)]]
    return out


def engine(model: Path, **kwargs: Any) -> LLMEngine:
    return LLMEngine(str(model), **{**ENGINE, **kwargs})


def run(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, RequestOutput]:
    """Step until every request finished; the last output of each request."""
    done: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return done
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.core.kv_manager.check_integrity()
    raise AssertionError("the engine did not finish")


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def prefill(p_engine: LLMEngine, prompts: list[list[int]], rid: str = "p") -> dict[str, Optional[dict]]:
    """Run prompts through a prefill engine; request id -> its kv_transfer_params answer."""
    for i, ids in enumerate(prompts):
        p_engine.add_request({"prompt_token_ids": ids}, greedy(1), request_id=f"{rid}{i}",
                             kv_transfer_params={"do_remote_decode": True})
    outs = run(p_engine)
    return {k: v.kv_transfer_params for k, v in outs.items()}
