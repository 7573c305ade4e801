"""From how many rows a packed CPU linear runs through MKL's `F.linear` instead of the blocked kernel.

Why: kvserve's blocked kernel (kvserve.models.cpu_gemm) streams each weight block once and reuses
it for every row, which is what decode steps of 1-64 rows need, and there it beats MKL and oneDNN on
every machine measured.  At prefill sizes (hundreds to thousands of rows) the kernel is compute-bound,
and on some CPUs MKL's sgemm is faster: on the 2-core Intel Xeons with AVX-512 (sessions 12 and 14,
`benchmarks/cpu_linear.py`) MKL took 1164 against 1476 ms and 2423 against 3145 ms for a 2048-row
SmolLM2 forward, ~20% less; on the AMD EPYCs it was slower than the blocked kernel at every size.
So the choice is measured on the machine: `calibrate` times one decoder layer's projections both
ways at a few prefill row counts when the weights are packed, and the model keeps its plain weights
(one more copy of the decoder layers' projections: 405 MB for SmolLM2-135M in float32) only where MKL wins.

The copy is kept only while it takes at most a quarter of the memory available after the load
(MAX_MEMORY_SHARE): a large model keeps the blocked kernel and its memory.

KVSERVE_CPU_LINEAR_ROWS: "auto" (default: calibrate), "off" (the blocked kernel at every size, the
plain weights freed), or an integer N (MKL from N rows, no calibration: for tests and A/B runs).
The result of either kernel equals `F.linear` up to float rounding; the parity tests hold the
engine to HF transformers token for token with the dispatch on (tests/parity) and the decoder stack
to the Python layers bit for bit across the threshold (tests/unit/worker/test_cpu_decoder_stack.py).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from kvserve.models import cpu_gemm

logger = logging.getLogger(__name__)

ENV = "KVSERVE_CPU_LINEAR_ROWS"

# Row counts timed by `calibrate`: the sizes of prefill chunks (the scheduler's token budget is
# 2048 by default).  Below the smallest, decode-sized steps, the blocked kernel always wins.
CANDIDATE_ROWS = (128, 256, 512, 1024, 2048)
# MKL must be this much faster at the largest candidate for the plain weights to be kept (a second
# copy of them is not worth less), and at least MIN_STEP_GAIN faster at the threshold and every
# size above it: near the crossover the two are within a start-up measurement's noise, so the
# threshold may move between runs (session 15, Intel Xeon: 128, 512 or 1024 over three runs,
# each with MKL 12-17% faster at 1024-2048 rows); the prefill chunks that matter take MKL anyway.
MIN_GAIN = 0.08
MIN_STEP_GAIN = 0.03
# Layers smaller than this are not timed (the blocked kernel is kept): their calls take
# microseconds, too few for a start-up timing to tell the kernels apart, and the tiny test models
# would then take either path at random.  SmolLM2-135M's layer holds 14 MB.
MIN_LAYER_BYTES = 4 << 20
_REPS = 5
# The plain weights are kept only while they take at most this share of the memory available after
# the load: the KV cache and the host tier need the rest (a 7B model in float32 would double 28 GB).
MAX_MEMORY_SHARE = 0.25


def available_memory_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo (Linux), else None (the check is skipped)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def setting() -> Optional[int] | str:
    """The parsed environment setting: "auto", "off" or a row count."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("auto", "off"):
        return value
    try:
        rows = int(value)
    except ValueError:
        raise ValueError(f"{ENV}={value!r}: expected auto, off or a row count") from None
    if rows < 1:
        raise ValueError(f"{ENV}={value!r}: the row count must be at least 1")
    return rows


def _best_pair_ms(a: Callable[[], torch.Tensor], b: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """Best of _REPS timings of `a` and of `b`, taken alternately so that a burst of noise (another
    process starting beside the engine) hits both kernels rather than one."""
    best_a = best_b = float("inf")
    for _ in range(_REPS):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        best_a, best_b = min(best_a, t1 - t0), min(best_b, t2 - t1)
    return best_a * 1e3, best_b * 1e3


def calibrate(weights: Sequence[torch.Tensor], packed: Sequence[torch.Tensor],
              candidates: Sequence[int] = CANDIDATE_ROWS) -> Optional[int]:
    """The smallest candidate row count from which `F.linear` over `weights` (one layer's plain
    [N, K] projections) beats the blocked kernel over `packed` (the same, column-blocked) by
    MIN_STEP_GAIN at that size and every larger candidate, given a MIN_GAIN lead at the largest;
    None where it does not.  Best of a few timings each (~1 s at start-up for SmolLM2-135M)."""
    if sum(w.numel() * w.element_size() for w in weights) < MIN_LAYER_BYTES:
        return None
    in_features = {w.shape[1] for w in weights}
    gains: list[float] = []
    for rows in candidates:
        xs = {k: torch.randn(rows, k) for k in in_features}

        def mkl() -> torch.Tensor:
            return [F.linear(xs[w.shape[1]], w) for w in weights][-1]

        def blocked() -> torch.Tensor:
            return [cpu_gemm.linear(xs[w.shape[1]], p, None, w.shape[0]) for w, p in zip(weights, packed)][-1]

        mkl(), blocked()  # warm-up: first-touch of outputs, MKL's own buffers
        t_mkl, t_blocked = _best_pair_ms(mkl, blocked)
        gains.append(1.0 - t_mkl / t_blocked)
        logger.debug("linear calibration at %d rows: blocked %.2f ms, MKL %.2f ms", rows, t_blocked, t_mkl)
    if gains[-1] < MIN_GAIN:
        return None
    threshold = None
    for rows, gain in reversed(list(zip(candidates, gains))):
        if gain < MIN_STEP_GAIN:
            break
        threshold = rows
    return threshold
