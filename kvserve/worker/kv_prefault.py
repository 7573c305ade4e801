"""Fault the first blocks of the CPU KV pool in at start-up, before requests write to them.

The pool is allocated untouched (kvserve.utils.cpu_alloc.zero_pages: start-up costs nothing),
so the first write to each page takes a page fault and the kernel zeroes the page.  On the
virtual machines this project runs on, a fresh page costs far more than its zeroing: 2.4-3.5 ms
per MB with 2 MB pages (~0.4 GB/s: the hypervisor backs guest memory on first touch), measured
inside the engine as 1.3-1.6 s of a ~21 s W1 run spent in the KV writes of prefill steps
(`write_kv`: 8.4 ms per 2048-token layer write, against 0.4 ms once the pages exist).  vLLM
and llama.cpp pay that cost at start-up by zero-filling their whole pool.

kvserve faults in, at start-up, the blocks the first steps are given (the block pool hands
free blocks out in ascending id order): by default four full steps' worth
(engine_core.KV_PREFAULT_STEPS x max_num_batched_tokens; SmolLM2-135M: 8192 tokens = 377 MB,
~1.2 s here).  The rest of the pool still faults in on first write, so a large pool costs no
start-up time and no resident memory it does not use.  (A background thread in the idle class
faulting the rest measured no better on W1, 21.21 vs 21.40 s median of 3, and would make every
idle engine's whole pool resident.)

Populating never changes contents: MADV_POPULATE_WRITE (Linux >= 5.14) maps each page as a
write would, without writing.  Where that madvise is missing nothing is done: pages fault on
first use, as before.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from kvserve.utils.cpu_alloc import populate

logger = logging.getLogger(__name__)


def prefault_kv_blocks(kv_caches: Sequence[torch.Tensor], num_blocks: int) -> int:
    """Fault in blocks [0, num_blocks) of per-layer pools `[2 (K, V), pool_blocks, block_size,
    kvh, head_dim]`, both halves of every layer.  Returns the blocks now resident in every
    layer: `num_blocks` (capped at the pool), or 0 where populating is unsupported."""
    if not kv_caches:
        return 0
    pool_blocks = int(kv_caches[0].shape[1])
    blocks = min(num_blocks, pool_blocks)
    block_bytes = kv_caches[0][0, 0].numel() * kv_caches[0].element_size()  # one block of one half
    t0 = time.perf_counter()
    for pool in kv_caches:
        for half in (0, 1):
            if not populate(pool, half * pool_blocks * block_bytes, blocks * block_bytes):
                return 0
    logger.debug("KV pool: %d of %d blocks faulted in at start-up in %.2f s", blocks, pool_blocks,
                 time.perf_counter() - t0)
    return blocks
