"""Measure this machine's fp32 matmul FLOP/s and memory bandwidth with torch.

Each measurement is the median of `repeats` timed runs after warm-up.  Because a roofline bound
must use the *best* rate the machine reaches, the reported figures are the maximum over the
matmul sizes tried (of each size's median; torch.mm and, where torch has it, oneDNN with packed weights,
the kernel the engine uses on CPU) and the larger of read bandwidth (`sum` over a large
tensor: bytes read / time) and copy bandwidth (`copy_`: bytes read + written / time).

The result JSON (`matmul_flops`, `mem_bandwidth`, `mem_bytes`, ...) is what
`kvserve roofline --hw FILE` and the `cpu-local` preset read.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

CACHE_ENV = "KVSERVE_HW_PROBE"


def cache_path() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kvserve" / "hw-probe.json"


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _physical_memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0.0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe(
    matmul_sizes: tuple[int, ...] = (1024, 2048),
    mem_mib: int = 256,
    repeats: int = 7,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the probe; returns a JSON-able dict."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    matmul: dict[str, float] = {}
    onednn: dict[str, float] = {}
    for n in matmul_sizes:
        a = torch.randn(n, n, dtype=torch.float32)
        b = torch.randn(n, n, dtype=torch.float32)
        c = torch.empty(n, n, dtype=torch.float32)
        t = _median_time(lambda: torch.mm(a, b, out=c), repeats)
        matmul[str(n)] = 2.0 * n**3 / t
        if torch.backends.mkldnn.is_available():
            # oneDNN with packed weights, as the engine's CPU linears run (kvserve/models/cpu_linear.py):
            # on some CPUs (AMD under MKL) it reaches ~2x torch.mm, and the peak is what the best kernel does.
            packed = torch.ops.mkldnn._reorder_linear_weight(b)
            t = _median_time(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""), repeats)
            onednn[str(n)] = 2.0 * n**3 / t
            del packed
        del a, b, c

    numel = mem_mib * (1 << 20) // 4
    src = torch.ones(numel, dtype=torch.float32)
    dst = torch.empty_like(src)
    nbytes = numel * 4
    read_bw = nbytes / _median_time(lambda: src.sum(), repeats)
    copy_bw = 2 * nbytes / _median_time(lambda: dst.copy_(src), repeats)
    del src, dst

    return {
        "name": f"cpu-local ({_cpu_name()}, {torch.get_num_threads()} threads)",
        "dtype": "fp32",
        "matmul_flops": max(list(matmul.values()) + list(onednn.values())),
        "matmul_flops_by_size": matmul,
        "onednn_matmul_flops_by_size": onednn,
        "mem_bandwidth": max(read_bw, copy_bw),
        "mem_read_bandwidth": read_bw,
        "mem_copy_bandwidth": copy_bw,
        "mem_bytes": _physical_memory_bytes(),
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "torch_version": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save(result: dict[str, Any], path: str | Path) -> Path:
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2) + "\n")
    return p


def cached_or_probe() -> Path:
    """The cached probe result, running (and caching) a probe first if there is none."""
    p = cache_path()
    if not p.exists():
        save(probe(), p)
    return p


def format_result(r: dict[str, Any]) -> str:
    sizes = ", ".join(f"{n}: {f / 1e9:.1f}" for n, f in r["matmul_flops_by_size"].items())
    return (
        f"{r['name']}\n"
        f"  fp32 matmul      {r['matmul_flops'] / 1e9:8.1f} GFLOP/s   (by size: {sizes})\n"
        f"  memory bandwidth {r['mem_bandwidth'] / 1e9:8.1f} GB/s      "
        f"(read {r['mem_read_bandwidth'] / 1e9:.1f}, copy {r['mem_copy_bandwidth'] / 1e9:.1f})\n"
        f"  memory size      {r['mem_bytes'] / 1e9:8.1f} GB"
    )
