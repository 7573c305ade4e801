#!/usr/bin/env python
"""F.linear vs kvserve's blocked CPU linear (kvserve/models/cpu_gemm.py) vs oneDNN packed weights,
over the weights of a whole SmolLM2-135M forward (30 layers: q|k|v, o, gate|up, down; and the
[49152, 576] LM head), float32, for the row counts of decoding and prefill.

    chrt -f 50 python benchmarks/cpu_linear.py [--rows 1,2,8,32,128,512] [--reps 5] [--threads 2]

Each weight is distinct (538 MB in all, far above any cache), so M = 1 reads every weight from
DRAM as a batch-1 decode step does.  Prints the median ms per forward and the GB/s and GFLOP/s it
implies.  Timings are only meaningful on an otherwise idle machine (or under `chrt -f`).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from kvserve.models import cpu_gemm, cpu_linear

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) per SmolLM2-135M layer
NUM_LAYERS = 30
LM_HEAD = (49152, 576)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,8,32,128,512")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-lm-head", action="store_true",
                    help="layer weights only (prefill row counts: the engine runs the head on sampled rows only)")
    ap.add_argument("--kernels", default="", help="comma-separated subset of: flinear,blocked,onednn (default all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = LAYER_SHAPES * NUM_LAYERS + ([] if args.no_lm_head else [LM_HEAD])
    weights = [torch.randn(n, k) for n, k in shapes]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights] if torch.backends.mkldnn.is_available() else None
    blocked = [cpu_gemm.pack_weight(w) for w in weights] if cpu_gemm.load() is not None else None
    nbytes = sum(w.numel() for w in weights) * 4
    kernels: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
        "F.linear": lambda x, i: F.linear(x, weights[i]),
    }
    if blocked is not None:  # kvserve's own kernel on its column-blocked packing (the default)
        kernels["kvserve blocked"] = lambda x, i: cpu_linear.linear(x, None, packed=blocked[i])
    if packed is not None:
        kernels["oneDNN packed"] = lambda x, i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")
    if args.kernels:
        keep = {"flinear": "F.linear", "blocked": "kvserve blocked", "onednn": "oneDNN packed"}
        wanted = {keep[k] for k in args.kernels.split(",")}
        kernels = {name: fn for name, fn in kernels.items() if name in wanted}
    print(f"{'rows':>5} {'kernel':>16} {'ms/forward':>11} {'GB/s':>6} {'GFLOP/s':>8}")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {k: torch.randn(rows, k) for k in {k for _, k in shapes}}
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for _ in range(args.reps + 1):  # the first round warms up, interleaved so drift hits all kernels
            for name, fn in kernels.items():
                t0 = time.perf_counter()
                for i, (_, k) in enumerate(shapes):
                    fn(inputs[k], i)
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            t = statistics.median(ts[1:])
            print(f"{rows:5d} {name:>16} {t * 1e3:11.1f} {nbytes / t / 1e9:6.1f} {2 * rows * nbytes / 4 / t / 1e9:8.1f}")


if __name__ == "__main__":
    main()
