"""CacheBlend through the engine on a tiny random Llama: ratio 1.0 equals full recompute
token for token, exact placed KV gives the exact result at any ratio (placement, key
re-rotation and the subset recompute are right), prompts without segments are untouched,
and bad segments are refused clearly."""
from __future__ import annotations

import random

import pytest
import torch

from kvserve import LLM, SamplingParams
from tests.helpers.tiny_models import build_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 4 layers: the check layer (1) and subset layers after it both run.
    return str(build_tiny_model("llama3", tmp_path_factory.mktemp("blend"), overrides={"num_hidden_layers": 4}))


def _segments(seed: int, lens=(20, 37, 50, 33, 9)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in lens]


class _Rows:
    """First-token log-softmax rows per request, from the runner's sampling hook."""

    def __init__(self, llm: LLM) -> None:
        self.rows: dict[str, list[torch.Tensor]] = {}
        llm.engine.core.runner.sample_logprobs_hook = self._hook

    def _hook(self, ids, lp) -> None:
        for i, r in zip(ids, lp):
            self.rows.setdefault(i, []).append(r.clone())


def _llm(model_dir: str, **kw) -> LLM:
    return LLM(model_dir, num_kv_blocks=96, block_size=16, attention_backend="torch", **kw)


def _run(llm: LLM, prompt) -> list[int]:
    out = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    llm.engine.core.kv_manager.check_integrity()
    return list(out.outputs[0].token_ids)


def test_ratio_one_equals_full_recompute_token_for_token(model_dir):
    segs = _segments(0)
    flat = [t for s in segs for t in s]
    with _llm(model_dir, blend_recompute_ratio=1.0) as llm:
        rows = _Rows(llm)
        # Cache the documents at other positions first (another order).
        _run(llm, {"segments": [segs[0], segs[3], segs[1], segs[2], segs[4]]})
        stats = llm.engine.core.chunk_cache.stats
        assert (stats.hits, stats.misses) == (0, 3)
        ref = llm.generate({"prompt_token_ids": flat}, GREEDY, use_tqdm=False)[0]
        blended = llm.generate({"segments": segs}, GREEDY, use_tqdm=False)[0]
        assert (stats.hits, stats.misses, stats.blends) == (3, 3, 2)
        assert blended.outputs[0].token_ids == ref.outputs[0].token_ids
        # Bit for bit: the same calls as an ordinary prefill.
        assert torch.equal(rows.rows[blended.request_id][0], rows.rows[ref.request_id][0])
        llm.engine.core.kv_manager.check_integrity()


@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.5])
def test_exact_chunk_kv_gives_the_full_result_at_any_ratio(model_dir, ratio):
    # A prompt that is [prefix, doc, question]: the doc's chunk KV (computed after the
    # prompt's first segment alone) is exactly its KV in the prompt, so blending must
    # reproduce full prefill whatever it recomputes.  A wrong placement, rotation, mask,
    # selection or sink (e.g. the BOS alone instead of the whole first segment) breaks this.
    segs = _segments(1, lens=(9, 45, 11))
    flat = [t for s in segs for t in s]
    with _llm(model_dir, blend_recompute_ratio=ratio) as llm:
        rows = _Rows(llm)
        ref = llm.generate({"prompt_token_ids": flat}, GREEDY, use_tqdm=False)[0]
        # Computes and caches the chunk (at another ratio: its blocks are then no prefix hit).
        _run(llm, {"segments": segs, "blend_recompute_ratio": 1.0})
        out = llm.generate({"segments": segs}, GREEDY, use_tqdm=False)[0]
        assert llm.engine.core.chunk_cache.stats.hits == 1
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        torch.testing.assert_close(rows.rows[out.request_id][0], rows.rows[ref.request_id][0],
                                   atol=1e-4, rtol=1e-4)


def test_chunks_are_computed_after_the_first_segment(model_dir):
    # The sink is the whole first segment: the same documents after another first segment
    # are other chunks (misses), in another order after the same one they are hits.
    a, b, c, q = _segments(7, lens=(12, 30, 25, 6))
    other = _segments(8, lens=(12,))[0]
    with _llm(model_dir) as llm:
        stats = llm.engine.core.chunk_cache.stats
        _run(llm, {"segments": [a, b, c, q]})
        _run(llm, {"segments": [a, c, b, q]})
        assert (stats.hits, stats.misses) == (2, 2)
        _run(llm, {"segments": [other, b, c, q]})
        assert (stats.hits, stats.misses) == (2, 4)
        # The first token alone (sink_tokens=1): found after any first segment starting with it.
        llm.engine.core.chunk_cache.sink_tokens = 1
        _run(llm, {"segments": [[a[0], *other[1:]], b, c, q]})
        assert (stats.hits, stats.misses) == (2, 6)
        _run(llm, {"segments": [[a[0], *other[2:]], c, b, q]})
        assert (stats.hits, stats.misses) == (4, 6)


def test_moved_chunks_at_ratio_zero_differ_from_full_prefill(model_dir):
    # The other side of the test above: chunks after other documents lack cross-chunk
    # attention, so naive reuse (ratio 0) really changes the distribution.
    segs = _segments(2)
    flat = [t for s in segs for t in s]
    with _llm(model_dir, blend_recompute_ratio=0.0) as llm:
        rows = _Rows(llm)
        ref = llm.generate({"prompt_token_ids": flat}, GREEDY, use_tqdm=False)[0]
        _run(llm, {"segments": segs, "blend_recompute_ratio": 1.0})
        out = llm.generate({"segments": segs}, GREEDY, use_tqdm=False)[0]
        assert llm.engine.core.chunk_cache.stats.hits == 3
        diff = (rows.rows[out.request_id][0] - rows.rows[ref.request_id][0]).abs().max()
        assert diff > 1e-3


def test_prompts_without_segments_are_untouched(model_dir):
    segs = _segments(3)
    flat = [t for s in segs for t in s]
    plain = [_segments(4, lens=(70,))[0], flat]
    with _llm(model_dir) as fresh:
        expected = [_run(fresh, {"prompt_token_ids": p}) for p in plain]
        assert fresh.engine.core.chunk_cache.stats.blends == 0
    with _llm(model_dir, blend_recompute_ratio=0.0) as llm:
        _run(llm, {"segments": segs})
        _run(llm, {"segments": segs})  # blended at ratio 0: approximate KV in its blocks
        # The same tokens as a plain prompt read none of the blended blocks (own hashes).
        assert [_run(llm, {"prompt_token_ids": p}) for p in plain] == expected


def test_uncached_segments_are_computed_and_cached_once(model_dir):
    a, b, c, d = _segments(5, lens=(20, 30, 30, 5))
    with _llm(model_dir) as llm:
        stats = llm.engine.core.chunk_cache.stats
        _run(llm, {"segments": [a, b, c, d]})
        assert (stats.hits, stats.misses) == (0, 2)
        _run(llm, {"segments": [a, c, b, d]})
        assert (stats.hits, stats.misses) == (2, 2)
        # [a, c] again: the prefix cache (the previous request's blocks) covers a and most
        # of c, so only the new document is looked up: a miss.
        _run(llm, {"segments": [a, c, _segments(6, lens=(17,))[0], d]})
        assert (stats.hits, stats.misses) == (2, 3)
        assert stats.tokens_chunked == 60 + 60 + 17
        assert stats.tokens_recomputed + stats.tokens_reused == stats.tokens_chunked


def test_text_segments_and_bad_segments(model_dir, tmp_path):
    with _llm(model_dir) as llm:
        with pytest.raises(ValueError, match="segment 1 is empty"):
            llm.generate({"segments": [[1, 2], [], [3]]}, GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="at most 64"):
            llm.generate({"segments": [[1]] * 65}, GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="segment 1 has 2000 tokens"):
            llm.generate({"segments": [[1], [2] * 2000, [3]]}, GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="string or a list of token ids"):
            llm.generate({"segments": [[1], {"x": 1}, [3]]}, GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="no tokenizer"):
            llm.generate({"segments": ["text", "more"]}, GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="n > 1"):
            llm.generate({"segments": [[1], [2], [3]]}, SamplingParams(n=2), use_tqdm=False)
        with pytest.raises(ValueError, match=r"blend_recompute_ratio must be in \[0, 1\]"):
            llm.generate({"segments": [[1], [2], [3]], "blend_recompute_ratio": 1.5}, GREEDY, use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
        assert _run(llm, {"segments": [[1, 2], [3, 4, 5], [6]]})  # the engine still serves


def test_chunks_from_the_cpu_tier_blend_like_chunks_on_the_device(model_dir):
    segs = _segments(7)
    moved = [segs[0], segs[2], segs[3], segs[1], segs[4]]
    with _llm(model_dir, blend_recompute_ratio=0.15) as device_only:
        rows = _Rows(device_only)
        _run(device_only, {"segments": segs})
        expected = device_only.generate({"segments": moved}, GREEDY, use_tqdm=False)[0]
        expected_row = rows.rows[expected.request_id][0]
    with _llm(model_dir, blend_recompute_ratio=0.15, kv_tiers="cpu:64MiB", kv_offload_policy="finish") as llm:
        rows = _Rows(llm)
        core = llm.engine.core
        _run(llm, {"segments": segs})  # computes the chunks; under "finish" they go down to the tier
        assert core.wait_for_kv_saves(60)
        assert core.reset_prefix_cache()  # nothing on the device any more
        out = llm.generate({"segments": moved}, GREEDY, use_tqdm=False)[0]
        stats = core.chunk_cache.stats
        assert (stats.hits, stats.tier_hits, stats.misses) == (3, 3, 3)
        # The raw codec round trip is exact: the same blend as with the chunks on the device.
        assert out.outputs[0].token_ids == expected.outputs[0].token_ids
        assert torch.equal(rows.rows[out.request_id][0], expected_row)
        core.kv_manager.check_integrity()
