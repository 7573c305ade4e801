"""Keep freed activation memory in the process heap on CPU.

PyTorch's CPU allocator has no cache: every large intermediate (a
[2048, 1536] float32 activation is 12 MiB) is malloc'd and freed each layer.
glibc serves blocks above its mmap threshold with fresh mmap()s, so each one
is page-faulted and zeroed by the kernel on first touch, and munmap()ed on
free; on a 2-core machine that costs seconds per prefill step.  Raising the
mmap and trim thresholds makes glibc reuse heap memory instead, which is what
vLLM's CPU backend gets by preloading tcmalloc.  The heap then holds at most
the peak working set, which the engine needs anyway.

Opt out with KVSERVE_NO_MALLOC_TUNING=1.

`zero_pages` allocates large zero tensors (the KV pool, the packed weights) without writing
them, in transparent huge pages where the kernel allows them (see there); `populate` faults
a byte range of such a tensor in ahead of use.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import mmap
import os
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    """The C library, or None where it cannot be found or loaded."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def tune_malloc(threshold_bytes: int = 1 << 30) -> bool:
    """Apply once per process; returns whether glibc accepted the settings."""
    global _done
    if _done or os.environ.get("KVSERVE_NO_MALLOC_TUNING"):
        return _done
    libc = _libc()
    if libc is None:
        return False
    try:
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold_bytes)
        )
    except AttributeError:  # not glibc (musl, macOS): nothing to tune
        return False
    _done = ok
    logger.debug("glibc malloc thresholds raised: %s", ok)
    return ok


def zero_pages(shape: tuple[int, ...], dtype: torch.dtype, huge_pages: bool = True) -> torch.Tensor:
    """A zero CPU tensor backed by anonymous mmap pages, which the kernel maps to the
    shared zero page until first written: allocation costs nothing, and each page is
    faulted in (zeroed) only when KV is first written to it.  `torch.zeros` instead
    writes every byte up front (a 2 GiB KV pool: ~1.6 s of CPU at start-up, for blocks
    most workloads never touch).  Contents are identical: all zeros.

    `huge_pages` asks for 2 MB transparent huge pages (madvise(MADV_HUGEPAGE); a no-op
    where THP is off).  Kernels that stream hundreds of MB (every weight once per decode
    step) or jump between KV blocks otherwise miss the TLB on every 4 KB page: a batch-1
    SmolLM2 decode step measured 31.3 -> 27.7 ms with the weights in huge pages."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without THP: 4 KB pages, same contents
            pass
    # frombuffer keeps `buf` alive for as long as the tensor (or a view of it) lives.
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


_MADV_POPULATE_WRITE = 23  # linux/mman.h; Python's mmap module does not name it before 3.13


def populate(t: torch.Tensor, start: int, nbytes: int) -> bool:
    """Fault in bytes [start, start + nbytes) of `t`'s storage, writable, without writing them
    (MADV_POPULATE_WRITE, Linux >= 5.14: contents are unchanged).  Returns False where the
    kernel or libc cannot: nothing was done then."""
    libc = _libc()
    if libc is None or nbytes <= 0:
        return False
    base = t.data_ptr() + start
    lo = base - base % mmap.PAGESIZE
    # ctypes drops the GIL for the call.
    if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(base + nbytes - lo), ctypes.c_int(_MADV_POPULATE_WRITE)) != 0:
        logger.debug("MADV_POPULATE_WRITE failed: errno %d", ctypes.get_errno())
        return False
    return True
