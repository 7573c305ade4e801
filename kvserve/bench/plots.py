"""PNG plots (matplotlib, headless Agg backend).

* `plot_latency_cdfs`: empirical CDFs of TTFT, TPOT, ITL and E2E latency, one line per run
  (one run per request rate in a sweep).
* `plot_rate_sweep`: mean and p99 latencies and throughput against the offered request rate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from kvserve.bench.client import RequestResult
from kvserve.bench.metrics import BenchSummary


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _latencies_ms(results: Sequence[RequestResult]) -> dict[str, np.ndarray]:
    ok = [r for r in results if r.success]
    return {
        "TTFT": np.array([r.ttft_s for r in ok if r.ttft_s is not None]) * 1e3,
        "TPOT": np.array([t for t in (r.tpot_s for r in ok) if t is not None]) * 1e3,
        "ITL": np.array([g for r in ok for g in r.itl_s]) * 1e3,
        "E2E latency": np.array([r.e2el_s for r in ok if r.e2el_s is not None]) * 1e3,
    }


def plot_latency_cdfs(runs: Sequence[tuple[str, Sequence[RequestResult]]], path: str | Path) -> Path:
    """`runs` is [(label, results)]; writes one figure with a panel per metric."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, metric in zip(axes.flat, ("TTFT", "TPOT", "ITL", "E2E latency")):
        for label, results in runs:
            values = np.sort(_latencies_ms(results)[metric])
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=label)
        ax.set_title(f"{metric} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_rate_sweep(summaries: Sequence[BenchSummary], path: str | Path) -> Path:
    """Latency (mean, p99) and throughput against the offered request rate."""
    plt = _pyplot()
    pts = sorted((s for s in summaries if s.request_rate is not None), key=lambda s: s.request_rate or 0.0)
    finite = [s for s in pts if np.isfinite(s.request_rate or np.inf)]
    # An infinite rate has no x position; put it one step past the largest finite rate.
    xs: list[float] = [float(s.request_rate) for s in finite if s.request_rate is not None]
    if len(finite) < len(pts):
        xs.append((max(xs) * 1.5) if xs else 1.0)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, name in zip(axes.flat, ("ttft", "tpot", "e2el")):
        for stat, style in (("mean", "o-"), ("p99", "s--")):
            ys = [getattr(getattr(s, name), stat) if getattr(s, name) else np.nan for s in pts]
            ax.plot(xs, ys, style, label=stat)
        ax.set_title(f"{name.upper()} vs request rate")
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes.flat[3]
    ax.plot(xs, [s.output_throughput for s in pts], "o-", label="output tok/s")
    ax.plot(xs, [s.request_throughput * 100 for s in pts], "s--", label="requests/s x100")
    if any(s.goodput is not None for s in pts):
        ax.plot(xs, [(s.goodput or 0.0) * 100 for s in pts], "^:", label="goodput req/s x100")
    ax.set_title("throughput vs request rate")
    ax.set_xlabel("offered request rate (req/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if len(finite) < len(pts):
        ticks = list(xs)
        ax_labels = [f"{x:g}" for x in ticks[:-1]] + ["inf"]
        for a in axes.flat:
            a.set_xticks(ticks, ax_labels)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
