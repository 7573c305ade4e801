"""Latency statistics, throughput, goodput and SLO attainment from per-request results.

Definitions (per request, successful requests only):
  TTFT  first token event - send
  TPOT  (E2EL - TTFT) / (output_tokens - 1); undefined for 1-token outputs
  ITL   every gap between successive token events (pooled over all requests)
  E2EL  end of stream - send
Throughput divides by the run's duration (first send to last completion):
  request throughput = completed / duration
  output throughput  = output tokens of completed requests / duration
  total throughput   = (prompt + output tokens of completed requests) / duration
Goodput is completed requests that meet every given SLO per second; SLO attainment is their share
of *all* requests sent (a failed request misses its SLO).  A request without a TPOT (1 output
token) meets any TPOT SLO.
Percentiles are numpy's linear interpolation (p50 = median).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from kvserve.bench.client import RequestResult
from kvserve.bench.errors import BenchInputError

PERCENTILES = (50, 90, 99)
_SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency targets in milliseconds; None = no target on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, items: Iterable[str]) -> SLO:
        """Parse `["ttft:500", "tpot:50", "e2el:10000"]`."""
        values: dict[str, float] = {}
        for item in items:
            key, sep, num = item.partition(":")
            key = key.strip().lower()
            if not sep or key not in _SLO_KEYS:
                raise BenchInputError(f"bad --goodput item {item!r}: use ttft:MS, tpot:MS or e2el:MS")
            try:
                value = float(num)
            except ValueError:
                raise BenchInputError(f"bad --goodput item {item!r}: {num!r} is not a number") from None
            if not value > 0:
                raise BenchInputError(f"bad --goodput item {item!r}: the target must be > 0 ms")
            values[f"{key}_ms"] = value
        return cls(**values)

    def is_empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None

    def met_by(self, r: RequestResult) -> bool:
        if not r.success:
            return False
        if self.ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1e3 > self.ttft_ms):
            return False
        tpot = r.tpot_s
        if self.tpot_ms is not None and tpot is not None and tpot * 1e3 > self.tpot_ms:
            return False
        if self.e2el_ms is not None and (r.e2el_s is None or r.e2el_s * 1e3 > self.e2el_ms):
            return False
        return True


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Milliseconds."""

    count: int
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of_seconds(cls, values_s: Sequence[float]) -> LatencyStats | None:
        if len(values_s) == 0:
            return None
        ms = np.asarray(values_s, dtype=np.float64) * 1e3
        p50, p90, p99 = (float(x) for x in np.percentile(ms, PERCENTILES))
        return cls(len(ms), float(ms.mean()), float(ms.std()), float(ms.min()), p50, p90, p99, float(ms.max()))


@dataclass(slots=True)
class BenchSummary:
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: LatencyStats | None
    tpot: LatencyStats | None
    itl: LatencyStats | None
    e2el: LatencyStats | None
    errors: dict[str, int] = field(default_factory=dict)
    slo: SLO | None = None
    good_requests: int | None = None
    goodput: float | None = None  # requests/s meeting every SLO
    slo_attainment: float | None = None  # fraction of all requests
    output_len_mismatches: int = 0  # completed requests whose output length != requested
    request_rate: float | None = None  # the offered rate of this run, if synthetic
    roofline_bound_s: float | None = None  # lower bound on the workload's time (roofline.py)
    roofline_fraction: float | None = None  # bound / duration
    tenants: dict[str, Any] | None = None  # --tenants: bench/tenants.py tenant_report
    slo_classes: dict[str, Any] | None = None  # --slo-classes: bench/tenants.py class_report

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    results: Sequence[RequestResult],
    duration_s: float,
    slo: SLO | None = None,
) -> BenchSummary:
    ok = [r for r in results if r.success]
    errors = Counter(r.error or "unknown error" for r in results if not r.success)
    in_tok = sum(r.prompt_len for r in ok)
    out_tok = sum(r.output_tokens for r in ok)
    dur = duration_s if duration_s > 0 else float("nan")
    summary = BenchSummary(
        num_requests=len(results),
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input_tokens=in_tok,
        total_output_tokens=out_tok,
        request_throughput=len(ok) / dur,
        output_throughput=out_tok / dur,
        total_token_throughput=(in_tok + out_tok) / dur,
        ttft=LatencyStats.of_seconds([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=LatencyStats.of_seconds([t for t in (r.tpot_s for r in ok) if t is not None]),
        itl=LatencyStats.of_seconds([g for r in ok for g in r.itl_s]),
        e2el=LatencyStats.of_seconds([r.e2el_s for r in ok if r.e2el_s is not None]),
        errors=dict(errors.most_common()),
        output_len_mismatches=sum(1 for r in ok if r.output_tokens != r.expected_output_len),
    )
    if slo is not None and not slo.is_empty():
        good = sum(1 for r in results if slo.met_by(r))
        summary.slo = slo
        summary.good_requests = good
        summary.goodput = good / dur
        summary.slo_attainment = good / len(results) if results else None
    return summary
