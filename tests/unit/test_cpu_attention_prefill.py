"""The C++ paged prefill kernel (csrc/paged_prefill_cpu.cpp) equals the reference backend.

Steps mix decodes with several prefill chunks: fresh prompts (start_pos 0) and chunks after
a cached prefix, chunk lengths from 1 to past a query tile (64 / G positions), contexts over
many non-contiguous blocks, GQA ratios 1 and 3 (and 8), head_dim 64/128 (the models we serve)
and odd ones (48, 80, 20), block sizes that split key tiles (32) or are not a multiple of 16.
Each vector path (AVX-512 where this CPU has it, AVX2, portable) is checked on its own.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from kvserve.worker.attention import cpu_ext, get_attention_backend
from kvserve.worker.attention.base import AttentionMetadata, ForwardContext, PrefillSeq
from kvserve.worker.attention.cpu_paged import pack_prefill_chunks

pytestmark = pytest.mark.skipif(cpu_ext.load_prefill() is None, reason="the CPU prefill extension could not be built")


def make_step(seed: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
              decodes: list[int], prefills: list[tuple[int, int]]):
    """A step over a shuffled pool: `decodes` are context lengths before the new token,
    `prefills` are (start_pos, q_len).  Returns cache, meta, q, k, v."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    seqs = [(s, 1) for s in decodes] + list(prefills)
    need = sum(-(-(s + n) // block_size) for s, n in seqs)
    num_blocks = need + 7
    free = list(range(num_blocks))
    rng.shuffle(free)  # tables hop around the pool
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g)
    tables, slots = [], []
    for s, n in seqs:
        blocks = [free.pop() for _ in range(-(-(s + n) // block_size))]
        tables.append(blocks)
        slots += [blocks[pos // block_size] * block_size + pos % block_size for pos in range(s, s + n)]
    nd = len(decodes)
    dec_tables = dec_lens = dec_mask = None
    if nd:
        mb = max(len(t) for t in tables[:nd])
        dec_tables = torch.zeros(nd, mb, dtype=torch.long)
        for i, t in enumerate(tables[:nd]):
            dec_tables[i, :len(t)] = torch.tensor(t)
        dec_lens = torch.tensor([s + 1 for s in decodes])
        dec_mask = (torch.arange(mb * block_size)[None] < dec_lens[:, None]).view(nd, 1, 1, -1)
    pre, off = [], nd
    for (s, n), t in zip(prefills, tables[nd:]):
        pre.append(PrefillSeq(off, n, s, torch.tensor(t)))
        off += n
    meta = AttentionMetadata(torch.tensor(slots), nd, dec_tables, dec_lens, dec_mask, pre, block_size)
    T = len(slots)
    scale = 3.0  # spread scores so the online softmax's rescaling and exp underflow are exercised
    q = torch.randn(T, heads, head_dim, generator=g) * scale / math.sqrt(head_dim) ** 0.5
    k = torch.randn(T, kv_heads, head_dim, generator=g)
    v = torch.randn(T, kv_heads, head_dim, generator=g)
    return cache, meta, q, k, v


def reference(cache, meta, q, k, v, heads, kv_heads, head_dim):
    ref = get_attention_backend("reference")(heads, kv_heads, head_dim, 1 / math.sqrt(head_dim))
    ref_cache = cache.clone()
    return ref.forward(0, q, k, v, ForwardContext(ref, [ref_cache], meta)), ref_cache


# (decodes, prefills): several chunks per step, start_pos 0 and > 0, lengths 1 .. > tile.
STEPS = [
    ([], [(0, 1)]),
    ([], [(0, 7), (0, 64), (0, 65)]),
    ([15, 16, 200], [(0, 33), (32, 17), (5, 40), (300, 1), (47, 5)]),
    ([3], [(0, 130), (100, 70), (511, 3), (16, 16)]),
]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128, 80, 48])
@pytest.mark.parametrize("step", range(len(STEPS)))
def test_backend_with_prefill_kernel_equals_reference(heads: int, kv_heads: int, head_dim: int, step: int) -> None:
    decodes, prefills = STEPS[step]
    cache, meta, q, k, v = make_step(step * 1000 + heads * 10 + head_dim, heads, kv_heads, head_dim, 16,
                                     decodes, prefills)
    expected, ref_cache = reference(cache, meta, q, k, v, heads, kv_heads, head_dim)
    impl = get_attention_backend("cpu")(heads, kv_heads, head_dim, 1 / math.sqrt(head_dim))
    assert impl._prefill_ext is not None
    got = impl.forward(0, q, k, v, ForwardContext(impl, [cache], meta))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(cache, ref_cache)


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("block_size", [16, 32, 5])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (16, 2, 20), (64, 1, 32)])
def test_kernel_paths_equal_reference(isa: str, block_size: int, heads: int, kv_heads: int, head_dim: int) -> None:
    ext = cpu_ext.load_prefill(isa)
    assert ext is not None, f"the {isa} build of the prefill kernel failed"
    assert isa == "native" or ext.simd_path() == isa
    prefills = [(0, 50), (37, 29), (3 * block_size, 1), (block_size - 1, 2 * block_size + 1)]
    cache, meta, q, k, v = make_step(block_size * 7 + heads + head_dim, heads, kv_heads, head_dim, block_size,
                                     [9], prefills)
    expected, ref_cache = reference(cache, meta, q, k, v, heads, kv_heads, head_dim)
    cache = ref_cache  # the reference wrote the step's K/V; the kernel only reads
    out = torch.full_like(q, float("nan"))
    chunks, block_ids = pack_prefill_chunks(meta.prefills)
    ext.paged_prefill_attention(out, q, cache[0], cache[1], chunks, block_ids, 1 / math.sqrt(head_dim))
    D = meta.num_decode_tokens
    torch.testing.assert_close(out[D:], expected[D:], atol=2e-5, rtol=1e-4)
    assert out[:D].isnan().all()  # rows outside the chunks are left alone


def test_strided_query_rows() -> None:
    """q and out as column slices of wider rows (as the model's fused qkv projection gives)."""
    heads, kv_heads, head_dim = 9, 3, 64
    cache, meta, q, k, v = make_step(5, heads, kv_heads, head_dim, 16, [], [(0, 20), (40, 9)])
    expected, ref_cache = reference(cache, meta, q, k, v, heads, kv_heads, head_dim)
    wide = torch.randn(q.shape[0], heads + 2 * kv_heads, head_dim)
    wide[:, :heads] = q
    out_wide = torch.zeros(q.shape[0], heads + 1, head_dim)
    chunks, block_ids = pack_prefill_chunks(meta.prefills)
    cpu_ext.load_prefill().paged_prefill_attention(out_wide[:, :heads], wide[:, :heads], ref_cache[0], ref_cache[1],
                                                   chunks, block_ids, 1 / math.sqrt(head_dim))
    torch.testing.assert_close(out_wide[:, :heads], expected, atol=2e-5, rtol=1e-4)
    assert (out_wide[:, heads] == 0).all()


def test_bad_descriptors_raise() -> None:
    cache, meta, q, k, v = make_step(1, 4, 4, 64, 16, [], [(0, 20)])
    ext = cpu_ext.load_prefill()
    out = torch.empty_like(q)
    chunks, block_ids = pack_prefill_chunks(meta.prefills)
    with pytest.raises(RuntimeError, match="block table out of range"):
        ext.paged_prefill_attention(out, q, cache[0], cache[1], chunks, block_ids[:1], 0.125)
    bad = chunks.clone()
    bad[0, 1] = q.shape[0] + 1
    with pytest.raises(RuntimeError, match="out of range"):
        ext.paged_prefill_attention(out, q, cache[0], cache[1], bad, block_ids, 0.125)
    ids = block_ids.clone()
    ids[0] = cache.shape[1]
    with pytest.raises(RuntimeError, match="block id out of range"):
        ext.paged_prefill_attention(out, q, cache[0], cache[1], chunks, ids, 0.125)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (8, 2, 80)])
def test_speculative_verify_batch(heads: int, kv_heads: int, head_dim: int) -> None:
    """Many short chunks after cached contexts (k+1 drafted positions per request): the kernel
    then runs one work item per chunk over all KV heads; mixed with decodes and one long chunk
    (whose items stay one per KV head)."""
    prefills = [(400 + 13 * i, 1 + i % 5) for i in range(12)] + [(0, 90)]
    cache, meta, q, k, v = make_step(heads + head_dim, heads, kv_heads, head_dim, 16, [30, 64], prefills)
    expected, ref_cache = reference(cache, meta, q, k, v, heads, kv_heads, head_dim)
    impl = get_attention_backend("cpu")(heads, kv_heads, head_dim, 1 / math.sqrt(head_dim))
    got = impl.forward(0, q, k, v, ForwardContext(impl, [cache], meta))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
