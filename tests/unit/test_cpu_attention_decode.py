"""The C++ paged decode kernel's AVX-512 path on shapes the older test file does not reach:
block sizes that split a block into several 16-key tiles (32, 48) or leave ragged tiles (5),
many requests of mixed lengths (the work queue hands them out one by one), and the prefetch
settings, which must not change a single bit of the result."""
from __future__ import annotations

import pytest
import torch

from kvserve.worker.attention import cpu_ext

ext = cpu_ext.load()
pytestmark = pytest.mark.skipif(ext is None, reason="the CPU attention extension could not be built")


def reference(q, k_cache, v_cache, tables, lens, scale):
    out = torch.empty_like(q)
    heads, kv_heads, bs = q.shape[1], k_cache.shape[2], k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(lens[b])
        blocks = tables[b, : -(-n // bs)]
        k = k_cache[blocks].reshape(-1, kv_heads, q.shape[2])[:n].repeat_interleave(heads // kv_heads, dim=1)
        v = v_cache[blocks].reshape(-1, kv_heads, q.shape[2])[:n].repeat_interleave(heads // kv_heads, dim=1)
        w = torch.softmax(scale * torch.einsum("hd,nhd->hn", q[b].double(), k.double()), dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", w, v.double()).float()
    return out


def make(block_size: int, heads: int, kv_heads: int, head_dim: int, lens: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    lens_t = torch.tensor(lens)
    max_blocks = -(-max(lens) // block_size)
    num_blocks = len(lens) * max_blocks + 5
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    return q, k_cache, v_cache, tables, lens_t


@pytest.mark.parametrize("block_size", [5, 32, 48])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 2, 128), (4, 4, 64)])
def test_tiles_within_blocks(block_size: int, heads: int, kv_heads: int, head_dim: int) -> None:
    lens = [1, 15, 16, 17, block_size, block_size + 1, 3 * block_size - 1, 333]
    q, k_cache, v_cache, tables, lens_t = make(block_size, heads, kv_heads, head_dim, lens, block_size + heads)
    for scale in (0.125, 4.0):
        got = ext.paged_decode_attention(q, k_cache, v_cache, tables, lens_t, scale)
        torch.testing.assert_close(got, reference(q, k_cache, v_cache, tables, lens_t, scale), atol=2e-5, rtol=1e-4)


def test_many_mixed_requests_and_prefetch_settings() -> None:
    lens = [(37 * i) % 500 + 1 for i in range(67)]
    q, k_cache, v_cache, tables, lens_t = make(16, 9, 3, 64, lens, 7)
    want = reference(q, k_cache, v_cache, tables, lens_t, 0.125)
    first = ext.paged_decode_attention(q, k_cache, v_cache, tables, lens_t, 0.125)
    torch.testing.assert_close(first, want, atol=2e-5, rtol=1e-4)
    try:
        for blocks, stride in ((0, 16), (4, 16), (2, 1024)):
            ext.set_prefetch(blocks, stride)
            assert torch.equal(ext.paged_decode_attention(q, k_cache, v_cache, tables, lens_t, 0.125), first)
    finally:
        ext.set_prefetch(*ext.default_prefetch())


def test_bad_seq_len_raises() -> None:
    q, k_cache, v_cache, tables, lens_t = make(16, 4, 4, 64, [20, 40], 3)
    lens_t[1] = tables.shape[1] * 16 + 1
    with pytest.raises(RuntimeError, match="seq_len out of range"):
        ext.paged_decode_attention(q, k_cache, v_cache, tables, lens_t, 0.125)
