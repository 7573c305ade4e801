"""CPU attention: the torch path against the C++ paged kernels, on the SmolLM2-135M shape.

    chrt -f 50 python benchmarks/attention_cpu.py [--cases prefill,prefix,verify,decode] [--repeats 5]

Cases (9 query heads, 3 KV heads, head_dim 64, block size 16, blocks shuffled over the pool):
  prefill  one chunk of 512 fresh tokens (start_pos 0)
  prefix   one chunk of 256 tokens after a 1024-token cached prefix
  verify   speculative verification: 32 requests x 5 query tokens after 400 cached tokens
  decode   batches 32 x 350 and 64 x 512 tokens of context
Each timing is one pass over 30 layers (30 separate KV pools in 2 MB pages, as the engine
allocates them, so the decode reads come from memory, not cache, without a TLB miss per block), through the backend's forward (K/V write included) for the
prefill cases and through the decode call alone for decode.  Prints the median over --repeats
passes in ms per layer, with GFLOP/s (prefill: 4 * head_dim flops per query head per visible
key) or GB/s (decode: bytes of K/V read / time).
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from typing import Callable

import torch

from kvserve.utils.cpu_alloc import zero_pages
from kvserve.worker.attention import get_attention_backend
from kvserve.worker.attention.base import AttentionMetadata, ForwardContext, PrefillSeq

HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS = 9, 3, 64, 16, 30


def build_step(decode_lens: list[int], prefills: list[tuple[int, int]], seed: int = 0):
    """Metadata and inputs for one step; decode_lens are contexts including the new token."""
    rng = random.Random(seed)
    seqs = [(n - 1, 1) for n in decode_lens] + prefills
    blocks_per = [-(-(s + q) // BLOCK) for s, q in seqs]
    num_blocks = sum(blocks_per) + 1
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in blocks_per]
    slots = [t[p // BLOCK] * BLOCK + p % BLOCK for (s, q), t in zip(seqs, tables) for p in range(s, s + q)]
    nd = len(decode_lens)
    dec_tables = dec_lens = dec_mask = None
    if nd:
        mb = max(blocks_per[:nd])
        dec_tables = torch.zeros(nd, mb, dtype=torch.long)
        for i in range(nd):
            dec_tables[i, :blocks_per[i]] = torch.tensor(tables[i])
        dec_lens = torch.tensor(decode_lens)
        dec_mask = (torch.arange(mb * BLOCK)[None] < dec_lens[:, None]).view(nd, 1, 1, -1)
    pre, off = [], nd
    for (s, q), t in zip(prefills, tables[nd:]):
        pre.append(PrefillSeq(off, q, s, torch.tensor(t)))
        off += q
    meta = AttentionMetadata(torch.tensor(slots), nd, dec_tables, dec_lens, dec_mask, pre, BLOCK)
    # As the engine allocates them: 2 MB pages (zero_pages), so block hops do not miss the TLB.
    caches = [zero_pages((2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM), torch.float32).normal_() for _ in range(LAYERS)]
    T = len(slots)
    qkv = [torch.randn(T, HEADS, HEAD_DIM), torch.randn(T, KV_HEADS, HEAD_DIM), torch.randn(T, KV_HEADS, HEAD_DIM)]
    return meta, caches, qkv


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: extension loaded, pages touched
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000 / LAYERS


def prefill_case(name: str, prefills: list[tuple[int, int]], repeats: int) -> None:
    meta, caches, (q, k, v) = build_step([], prefills)
    flops = sum(4 * HEAD_DIM * HEADS * (s + i + 1) for s, n in prefills for i in range(n))
    scale = 1 / math.sqrt(HEAD_DIM)
    results = {}
    for backend in ("torch", "cpu"):
        impl = get_attention_backend(backend)(HEADS, KV_HEADS, HEAD_DIM, scale)
        ctx = ForwardContext(impl, caches, meta)

        def run() -> None:
            for layer in range(LAYERS):
                impl.forward(layer, q, k, v, ctx)

        results[backend] = median_ms(run, repeats)
    t, c = results["torch"], results["cpu"]
    print(f"{name:<38} torch {t:8.3f} ms {flops / t / 1e6:6.1f} GFLOP/s | kernel {c:8.3f} ms "
          f"{flops / c / 1e6:6.1f} GFLOP/s | {t / c:5.2f}x")


def decode_case(batch: int, ctx_len: int, repeats: int) -> None:
    meta, caches, (q, _, _) = build_step([ctx_len] * batch, [])
    nbytes = 2 * batch * ctx_len * KV_HEADS * HEAD_DIM * 4  # K and V rows read, per layer
    scale = 1 / math.sqrt(HEAD_DIM)
    results = {}
    for backend in ("torch", "cpu"):
        impl = get_attention_backend(backend)(HEADS, KV_HEADS, HEAD_DIM, scale)

        def run() -> None:
            for layer in range(LAYERS):
                impl._decode(q, caches[layer], meta)

        results[backend] = median_ms(run, repeats)
    t, c = results["torch"], results["cpu"]
    print(f"{f'decode {batch} x {ctx_len}':<38} torch {t:8.3f} ms {nbytes / t / 1e6:6.1f} GB/s    | kernel {c:8.3f} ms "
          f"{nbytes / c / 1e6:6.1f} GB/s    | {t / c:5.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="prefill,prefix,verify,decode")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    cases = args.cases.split(",")
    print(f"{torch.get_num_threads()} threads; ms per layer, median of {args.repeats} passes over {LAYERS} layers")
    if "prefill" in cases:
        prefill_case("prefill 512 fresh", [(0, 512)], args.repeats)
    if "prefix" in cases:
        prefill_case("chunk 256 after 1024 cached", [(1024, 256)], args.repeats)
    if "verify" in cases:
        prefill_case("verify 32 x 5 after 400 cached", [(400, 5)] * 32, args.repeats)
    if "decode" in cases:
        decode_case(32, 350, args.repeats)
        decode_case(64, 512, args.repeats)


if __name__ == "__main__":
    main()
