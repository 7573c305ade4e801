"""KV offload tiers end to end: with the raw codec, outputs are identical to running without tiers.

A tiny random model with a device pool far smaller than the prompt set, so blocks are evicted
(and, with tiers, saved) during the first pass and found in a tier during the second.
"""
from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from kvserve import LLM, SamplingParams
from tests.helpers.tiny_models import build_tiny_model

BLOCK = 8
ENGINE = dict(block_size=BLOCK, num_kv_blocks=28, max_num_seqs=4, max_num_batched_tokens=256)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # A fresh seed per session gives fresh weights, hence a fresh KV namespace: entries a
    # previous run left in a shared Redis can never be hits here.
    return build_tiny_model("llama-tied", tmp_path_factory.mktemp("tiers_model"), seed=random.randrange(1 << 30))


def prompt_set(seed: int = 0) -> list[dict]:
    """4 shared 'documents' of 6 blocks, each followed by 4 different questions."""
    rng = random.Random(seed)
    docs = [[rng.randrange(512) for _ in range(6 * BLOCK)] for _ in range(4)]
    return [{"prompt_token_ids": doc + [rng.randrange(512) for _ in range(rng.randrange(9, 20))]}
            for doc in docs for _ in range(4)]


def two_passes(llm: LLM, prompts: list[dict]) -> list[list[list[int]]]:
    return [[o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] for _ in range(2)]


@pytest.fixture(scope="module")
def baseline(model) -> list[list[list[int]]]:
    return two_passes(LLM(str(model), **ENGINE), prompt_set())


@pytest.mark.parametrize("policy", ["evict", "finish"])
def test_cpu_tier_raw_codec_is_identical_to_no_tiers(model, baseline, policy):
    llm = LLM(str(model), kv_tiers="cpu:64MiB", kv_offload_policy=policy, **ENGINE)
    try:
        outs = two_passes(llm, prompt_set())
        stats = llm.engine.kv_tier_stats()
        assert llm.engine.core.kv_manager.pool.num_evictions > 0  # the pool really overflowed
    finally:
        llm.engine.close()
    assert outs == baseline
    assert stats["tiers"]["0:cpu"]["hits"] > 0 and stats["offload"]["blocks_used"] > 0
    assert stats["offload"]["blocks_truncated"] == 0 and stats["io"]["errors"] == 0
    assert stats["num_waiting_for_kv"] == 0


def test_cpu_then_disk_hierarchy_is_identical_to_no_tiers(model, baseline, tmp_path):
    llm = LLM(str(model), kv_tiers=f"cpu:40KiB,disk:{tmp_path}:64MiB", **ENGINE)
    try:
        outs = two_passes(llm, prompt_set())
        stats = llm.engine.kv_tier_stats()
    finally:
        llm.engine.close()
    assert outs == baseline
    # The cpu tier holds only a few blocks, so some hits come from the disk below it.
    assert stats["tiers"]["1:disk"]["store_hits"] > 0


def run_once(model: Path, prompts: list[dict], tiers: str) -> tuple[list[list[int]], dict]:
    """One engine ("finish" policy: every finished request's blocks are written), closed after."""
    llm = LLM(str(model), kv_tiers=tiers, kv_offload_policy="finish", **ENGINE)
    try:
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        return outs, llm.engine.kv_tier_stats()
    finally:
        llm.engine.close()


def test_disk_tier_survives_a_restart(model, baseline, tmp_path):
    prompts = prompt_set()
    first, st1 = run_once(model, prompts, f"disk:{tmp_path}:64MiB")
    assert st1["tiers"]["0:disk"]["bytes_written"] > 0
    second, st2 = run_once(model, prompts, f"disk:{tmp_path}:64MiB")  # a new engine: empty device cache
    assert first == second == baseline[0]
    assert st2["tiers"]["0:disk"]["hits"] > 0 and st2["offload"]["blocks_used"] > 0


def test_corrupt_disk_entries_are_recomputed_with_identical_outputs(model, baseline, tmp_path):
    prompts = prompt_set()
    run_once(model, prompts, f"disk:{tmp_path}:64MiB")
    files = sorted(tmp_path.rglob("*.kvb"))
    assert files
    for i, f in enumerate(files):
        data = bytearray(f.read_bytes())
        if i % 2:
            data[len(data) // 2] ^= 0x40  # a bit flip in the payload: checksum fails
            f.write_bytes(bytes(data))
        else:
            f.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    # One request per document: with the "finish" policy, nothing this run writes can be read back
    # by another request of the same run, so every lookup sees only the damaged entries.
    outs, st = run_once(model, prompts[::4], f"disk:{tmp_path}:64MiB")
    assert outs == baseline[0][::4]
    disk = st["tiers"]["0:disk"]
    assert disk["corrupt"] > 0 and disk["hits"] == 0
    # The lookups promised blocks the loads could not deliver: those hits were truncated.
    assert st["offload"]["blocks_truncated"] > 0 and st["offload"]["blocks_used"] == 0


def test_partially_corrupt_prefix_uses_the_blocks_before_the_bad_one(model, baseline, tmp_path):
    """A load that comes back None mid-way keeps only the leading blocks and recomputes the rest."""
    prompts = prompt_set()[:1]
    run_once(model, prompts, f"disk:{tmp_path}:64MiB")
    llm = LLM(str(model), kv_tiers=f"disk:{tmp_path}:64MiB", kv_offload_policy="finish", **ENGINE)
    try:
        tier = llm.engine.core.kv_tiers.store.tiers[0]
        req = llm.engine.core.make_request("probe", prompts[0]["prompt_token_ids"], GREEDY)
        path = tier.path_for(req.block_hashes[3])
        path.write_bytes(path.read_bytes()[:-1])
        out = llm.generate(prompts, GREEDY, use_tqdm=False)[0]
        st = llm.engine.kv_tier_stats()
    finally:
        llm.engine.close()
    assert out.outputs[0].token_ids == baseline[0][0]
    assert out.num_cached_tokens == 3 * BLOCK
    assert st["offload"]["blocks_used"] == 3 and st["offload"]["blocks_truncated"] > 0


def redis_up(port: int = 6379) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.mark.skipif(not redis_up(), reason="no Redis at 127.0.0.1:6379 (start one: bash scripts/start_redis.sh 6379)")
def test_redis_shared_between_two_engines(model, baseline):
    prompts = prompt_set()
    spec = "redis://127.0.0.1:6379/13?ttl=600"
    a = LLM(str(model), kv_tiers=spec, kv_offload_policy="finish", **ENGINE)
    b = LLM(str(model), kv_tiers=spec, kv_offload_policy="finish", **ENGINE)
    try:
        out_a = [o.outputs[0].token_ids for o in a.generate(prompts, GREEDY, use_tqdm=False)]
        assert a.engine.core.wait_for_kv_saves(30)  # A's saves are in Redis
        out_b = b.generate(prompts, GREEDY, use_tqdm=False)
        st_b = b.engine.kv_tier_stats()
    finally:
        a.engine.close()
        b.engine.close()
    assert out_a == [o.outputs[0].token_ids for o in out_b] == baseline[0]
    assert st_b["tiers"]["0:redis"]["hits"] > 0
    assert all(o.num_cached_tokens >= 6 * BLOCK for o in out_b)  # every document came from A


def test_lossy_codec_serves_hits(model, tmp_path):
    llm = LLM(str(model), kv_tiers=f"disk:{tmp_path}:64MiB", kv_codec="int8", **ENGINE)
    try:
        outs = two_passes(llm, prompt_set())
        st = llm.engine.kv_tier_stats()
    finally:
        llm.engine.close()
    assert st["tiers"]["0:disk"]["codec"].startswith("int8") and st["offload"]["blocks_used"] > 0
    assert all(len(o) == GREEDY.max_tokens for o in outs[1])


def test_bad_tier_options_are_refused(model):
    with pytest.raises(ValueError, match="kv_offload_policy"):
        LLM(str(model), kv_tiers="cpu:1MiB", kv_offload_policy="sometimes", **ENGINE)
    with pytest.raises(ValueError, match="codec"):
        LLM(str(model), kv_tiers="cpu:1MiB", kv_codec="zip", **ENGINE)
    with pytest.raises(ValueError, match="prefix_caching"):
        LLM(str(model), kv_tiers="cpu:1MiB", enable_prefix_caching=False, **ENGINE)
    llm = LLM(str(model), **ENGINE)
    assert llm.engine.kv_tier_stats() is None
    llm.engine.close()
