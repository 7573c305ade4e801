"""Fault the first blocks of the CPU KV pool in at start-up, before requests write to them.

The pool is allocated untouched (kvserve.utils.cpu_alloc.zero_pages: start-up costs nothing),
so the first write to each page takes a page fault and the kernel zeroes the page.  On the
virtual machines this project runs on, a fresh page costs far more than its zeroing: 2.4-3.5 ms
per MB with 2 MB pages (~0.4 GB/s: the hypervisor backs guest memory on first touch), measured
inside the engine as 1.3-1.6 s of a ~21 s W1 run spent in the KV writes of prefill steps
(`write_kv`: 8.4 ms per 2048-token layer write, against 0.4 ms once the pages exist).  vLLM
and llama.cpp pay that cost at start-up by zero-filling their whole pool.

kvserve faults in, at start-up, the blocks the first steps are given (the block pool hands
free blocks out in ascending id order): `sync_blocks`, by default four full steps' worth
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

import ctypes
import ctypes.util
import logging
import mmap
import time
from typing import Any, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

_MADV_POPULATE_WRITE = 23  # linux/mman.h; Python's mmap module does not name it before 3.13
_PAGE = mmap.PAGESIZE


def _libc_madvise() -> Optional[Any]:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).madvise  # ctypes drops the GIL for the call
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def populate(t: torch.Tensor, start: int, nbytes: int) -> bool:
    """Fault in bytes [start, start + nbytes) of `t`'s storage, writable, without writing
    them.  Returns False where the kernel (or libc) cannot: nothing was done then."""
    if _madvise is None or nbytes <= 0:
        return False
    base = t.data_ptr() + start
    lo = base - base % _PAGE
    if _madvise(lo, base + nbytes - lo, _MADV_POPULATE_WRITE) != 0:
        logger.debug("MADV_POPULATE_WRITE failed: errno %d", ctypes.get_errno())
        return False
    return True


class KVPoolPrefaulter:
    """Faults in blocks [0, sync_blocks) of per-layer pools `[2 (K, V), num_blocks, block_size,
    kvh, head_dim]`: both halves of every layer."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], sync_blocks: int) -> None:
        self.num_blocks = int(kv_caches[0].shape[1]) if kv_caches else 0
        self.layer_block_bytes = kv_caches[0][0, 0].numel() * kv_caches[0].element_size() if kv_caches else 0
        self.done_blocks = 0  # blocks [0, done_blocks) are resident in every layer
        t0 = time.perf_counter()
        self.supported = self._fault(kv_caches, min(sync_blocks, self.num_blocks))
        self.seconds = time.perf_counter() - t0
        logger.debug("KV pool: %d of %d blocks faulted in at start-up in %.2f s", self.done_blocks,
                     self.num_blocks, self.seconds)

    def _fault(self, kv_caches: Sequence[torch.Tensor], blocks: int) -> bool:
        bb = self.layer_block_bytes
        for pool in kv_caches:
            for half in (0, 1):
                if not populate(pool, half * self.num_blocks * bb, blocks * bb):
                    return False
        self.done_blocks = blocks
        return True
