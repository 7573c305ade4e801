"""The C++ paged decode kernel (one pass, online softmax, vectorized exp) against plain
softmax attention over the gathered K/V: context lengths around block edges, GQA group
sizes, and scores spread far enough that exp underflows."""
from __future__ import annotations

import pytest
import torch

from kvserve.worker.attention import cpu_ext

ext = cpu_ext.load()
pytestmark = pytest.mark.skipif(ext is None, reason="the CPU attention extension could not be built")


def reference(q, k_cache, v_cache, tables, lens, scale):
    out = torch.empty_like(q)
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    bs = k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(lens[b])
        blocks = tables[b, : -(-n // bs)]
        k = k_cache[blocks].reshape(-1, kv_heads, q.shape[2])[:n]  # [n, KVH, D]
        v = v_cache[blocks].reshape(-1, kv_heads, q.shape[2])[:n]
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        w = torch.softmax(scale * torch.einsum("hd,nhd->hn", q[b].double(), k.double()), dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", w, v.double()).float()
    return out


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128, 32])  # 64/128: the AVX2 register path; 32: the portable loop
def test_kernel_equals_softmax_attention(block_size: int, heads: int, kv_heads: int, head_dim: int) -> None:
    g = torch.Generator().manual_seed(block_size * 100 + heads * 10 + kv_heads + head_dim)
    lens = torch.tensor([1, block_size - 1, block_size, block_size + 1, 5 * block_size + 3, 700])
    max_blocks = -(-int(lens.max()) // block_size)
    num_blocks = len(lens) * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    for scale in (0.125, 4.0):  # 4.0: scores hundreds apart, most weights underflow to 0
        got = ext.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
        want = reference(q, k_cache, v_cache, tables, lens, scale)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
