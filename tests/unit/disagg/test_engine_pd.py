"""Prefill and decode engines in one process, KV through the shm transport: the decode engine's
greedy outputs equal a single engine's, and it computes no prompt token."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvserve.engine.llm_engine import LLMEngine
from tests.helpers.tiny_models import build_tiny_model
from tests.unit.disagg.helpers import BLOCK, engine, greedy, prefill, prompt_set, run

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_model("llama3", tmp_path_factory.mktemp("pd_model"), seed=3)


@pytest.fixture(scope="module")
def baseline(model) -> dict[int, list[int]]:
    e = engine(model)
    for i, ids in enumerate(prompt_set()):
        e.add_request({"prompt_token_ids": ids}, greedy(MAX_TOKENS), request_id=str(i))
    return {int(k): v.outputs[0].token_ids for k, v in run(e).items()}


@pytest.fixture
def shm(tmp_path) -> str:
    return f"shm://{tmp_path / 'kv'}"


def decode_all(d: LLMEngine, params: dict, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> dict:
    for i, ids in enumerate(prompts):
        d.add_request({"prompt_token_ids": ids}, greedy(max_tokens), request_id=str(i),
                      kv_transfer_params=params[f"p{i}"])
    return {int(k): v for k, v in run(d).items()}


def test_prefill_then_decode_matches_single_engine(model, baseline, shm, tmp_path):
    prompts = prompt_set()
    p = engine(model, role="prefill", kv_transfer=shm)
    d = engine(model, role="decode", kv_transfer=shm)
    params = prefill(p, prompts)
    assert all(v and v["do_remote_prefill"] for v in params.values())
    assert p.core.disagg.stats()["requests_exported"] == len(prompts)
    outs = decode_all(d, params, prompts)
    assert {i: o.outputs[0].token_ids for i, o in outs.items()} == baseline
    assert all(o.error is None for o in outs.values())
    st = d.core.disagg.stats()
    assert st["prompt_tokens_computed"] == 0  # not one prompt token computed on the decode side
    assert st["requests_imported"] + st["import_all_cached"] == len(prompts)
    total = sum(len(x) for x in prompts)
    # Shared prefixes: the second request finds the first one's imported blocks in the prefix cache.
    assert st["tokens_imported"] + st["tokens_import_cached"] == total
    assert st["tokens_import_cached"] >= 3 * BLOCK
    assert p.core.disagg.stats()["prompt_tokens_computed"] > 0
    # Nothing left behind: every export was consumed, no device block is held.
    assert os.listdir(tmp_path / "kv") == []
    for e in (p, d):
        assert e.core.kv_manager.req_blocks == {}
        e.core.kv_manager.check_integrity()


def test_cached_blocks_are_not_fetched_again(model, shm):
    prompt = prompt_set()[4]  # 41 tokens: 5 full blocks + 1 token
    p = engine(model, kv_transfer=shm)
    d = engine(model, kv_transfer=shm)
    # The decode engine computed this prompt itself before: its prefix cache holds 5 blocks.
    d.add_request({"prompt_token_ids": prompt}, greedy(2), request_id="warm")
    run(d)
    computed_before = d.core.disagg.stats()["prompt_tokens_computed"]
    params = prefill(p, [prompt])
    decode_all(d, params, [prompt], max_tokens=3)
    st = d.core.disagg.stats()
    assert st["prompt_tokens_computed"] == computed_before
    assert st["tokens_import_cached"] == 5 * BLOCK and st["tokens_imported"] == 1  # only the partial block
    assert st["bytes_imported"] == d.core.disagg.source.block_nbytes  # one block read


def test_first_token_that_ends_the_request_needs_no_transfer(model, baseline, shm, tmp_path):
    prompts = prompt_set()[:2]
    p = engine(model, kv_transfer=shm)
    d = engine(model, kv_transfer=shm)
    params = prefill(p, prompts)
    outs = decode_all(d, params, prompts, max_tokens=1)
    assert [outs[i].outputs[0].token_ids for i in range(2)] == [baseline[0][:1], baseline[1][:1]]
    assert all(o.outputs[0].finish_reason == "length" for o in outs.values())
    st = d.core.disagg.stats()
    assert st["import_first_token_final"] == 2 and st["bytes_imported"] == 0
    assert os.listdir(tmp_path / "kv") == []  # released without being read


def test_local_requests_are_counted(model, shm):
    e = engine(model, kv_transfer=shm)
    e.add_request({"prompt_token_ids": [1, 2, 3]}, greedy(2), request_id="x")
    run(e)
    st = e.core.disagg.stats()
    assert st["requests_local"] == 1 and st["prompt_tokens_computed"] == 3
    assert st["role"] == "both" and st["block_size"] == BLOCK


def test_bad_parameters_are_refused_at_add(model, shm):
    prompts = prompt_set()[2:4]  # 19 and 32 tokens: full blocks to hash
    p = engine(model, kv_transfer=shm)
    d = engine(model, kv_transfer=shm)
    params = prefill(p, prompts)
    with pytest.raises(ValueError, match="block_hashes do not match"):
        d.add_request({"prompt_token_ids": list(reversed(prompts[0]))}, greedy(3),
                      kv_transfer_params=params["p0"])
    with pytest.raises(ValueError, match="-token prompt"):
        d.add_request({"prompt_token_ids": prompts[1]}, greedy(3), kv_transfer_params=params["p0"])
    with pytest.raises(ValueError, match="do_remote_decode"):
        d.add_request({"prompt_token_ids": prompts[0]}, greedy(3), kv_transfer_params={"x": 1})
    other = engine(model, kv_transfer=shm, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        other.add_request({"prompt_token_ids": prompts[0]}, greedy(3), kv_transfer_params=params["p0"])
    assert not d.has_unfinished_requests()
