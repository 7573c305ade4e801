"""Every attention backend equals the reference on random mixed batches.

Odd sizes on purpose: contexts ending exactly at and just past block
boundaries, GQA ratios 1/2/4, head_dim 64 and 128, chunks after a cached prefix.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from kvserve.worker.attention import get_attention_backend
from kvserve.worker.attention.base import AttentionMetadata, ForwardContext, PrefillSeq


def make_batch(rng: random.Random, heads: int, kv_heads: int, head_dim: int, block_size: int = 16):
    num_blocks = 64
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim)
    free = list(range(num_blocks))
    rng.shuffle(free)
    # (start_pos, q_len): decodes first, then prefills with and without a cached prefix.
    shapes = [(15, 1), (16, 1), (0, 1), (47, 1), (100, 1), (0, 33), (32, 17), (5, 40), (0, 1)]
    decodes = [s for s in shapes if s[1] == 1][:-1]
    prefills = [s for s in shapes if s[1] > 1]
    seqs, slots = [], []
    for start, qlen in decodes + prefills:
        nb = -(-(start + qlen) // block_size)
        blocks = [free.pop() for _ in range(nb)]
        seqs.append((start, qlen, blocks))
        for pos in range(start, start + qlen):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
    T = len(slots)
    D = len(decodes)
    max_blocks = max(len(b) for s, q, b in seqs[:D])
    tables = torch.zeros(D, max_blocks, dtype=torch.long)
    lens = torch.tensor([s + 1 for s, q, b in seqs[:D]])
    for i, (s, q, b) in enumerate(seqs[:D]):
        tables[i, :len(b)] = torch.tensor(b)
    mask = (torch.arange(max_blocks * block_size)[None] < lens[:, None]).view(D, 1, 1, -1)
    pre, off = [], D
    for s, q, b in seqs[D:]:
        pre.append(PrefillSeq(off, q, s, torch.tensor(b)))
        off += q
    meta = AttentionMetadata(torch.tensor(slots), D, tables, lens, mask, pre, block_size)
    q = torch.randn(T, heads, head_dim)
    k = torch.randn(T, kv_heads, head_dim)
    v = torch.randn(T, kv_heads, head_dim)
    return cache, meta, q, k, v


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (6, 3, 64), (8, 2, 64)])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_backend_equals_reference(backend, heads, kv_heads, head_dim):
    rng = random.Random(heads * 100 + head_dim)
    torch.manual_seed(heads + kv_heads)
    cache, meta, q, k, v = make_batch(rng, heads, kv_heads, head_dim)
    scale = 1 / math.sqrt(head_dim)
    ref_cache = cache.clone()
    ref = get_attention_backend("reference")(heads, kv_heads, head_dim, scale)
    expected = ref.forward(0, q, k, v, ForwardContext(ref, [ref_cache], meta))
    impl = get_attention_backend(backend)(heads, kv_heads, head_dim, scale)
    got = impl.forward(0, q, k, v, ForwardContext(impl, [cache], meta))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(cache, ref_cache)  # the new K/V were written to the same slots
