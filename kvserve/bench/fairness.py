"""Per-tenant service and latency, for fairness measurements (docs/scheduling.md).

Shared by `kvserve bench serve --tenants ...` (token times from the stream) and
benchmarks/scheduling_policies.py (token times from the simulator or the offline engine).

Service in a window [t0, t1]: a request's prompt counts when its first token arrives (the
prefill is done), each output token when it arrives.  A tenant's *demand* is what the
requests it sent inside the window ask for (prompt + output tokens).

The target a fair scheduler should reach is the max-min fair (water-filling) allocation of
the tokens served in the window: each tenant gets capacity * its weight / the weights of the
tenants not yet satisfied, and a tenant asking for less than that gets what it asks, the
rest going to the others (VTC's guarantee: backlogged tenants share in proportion to their
weights; a tenant below its share is not held back).  So the served ratio heavy:light is
compared with the ratio of the targets, not with the weights alone: with the light tenant
below its share the target ratio is set by its demand, with both backlogged it is the ratio
of the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np


@dataclass(slots=True)
class TenantRequest:
    """One request's timing, in seconds on one clock (absolute or since the run's start)."""

    tenant: str
    arrival_s: float
    prompt_len: int
    output_len: int  # requested output tokens (demand)
    token_times_s: Sequence[float] = ()  # when each output token arrived; [0] is the first token

    @property
    def ttft_s(self) -> Optional[float]:
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None


@dataclass(slots=True)
class TenantStats:
    requests: int
    started: int  # requests with a first token
    served_prompt: int  # tokens served in the window
    served_output: int
    demand: int  # prompt + output tokens asked for by requests arriving in the window
    ttft_p50_s: Optional[float]
    ttft_p99_s: Optional[float]

    @property
    def served(self) -> int:
        return self.served_prompt + self.served_output


def served_in_window(reqs: Iterable[TenantRequest], t0: float, t1: float) -> dict[str, tuple[int, int]]:
    """Per tenant: (prompt tokens, output tokens) served in (t0, t1]."""
    out: dict[str, list[int]] = {}
    for r in reqs:
        acc = out.setdefault(r.tenant, [0, 0])
        times = r.token_times_s
        if times and t0 < times[0] <= t1:
            acc[0] += r.prompt_len
        acc[1] += sum(1 for t in times if t0 < t <= t1)
    return {t: (p, o) for t, (p, o) in out.items()}


def max_min_targets(capacity: float, demands: Mapping[str, float], weights: Mapping[str, float]) -> dict[str, float]:
    """Water-filling: each unsatisfied tenant gets capacity left * weight / their weights;
    one asking for less gets its demand and leaves the rest to the others."""
    left = dict(demands)
    targets: dict[str, float] = {}
    cap = capacity
    while left:
        total_w = sum(weights.get(t, 1.0) for t in left)
        share = {t: cap * weights.get(t, 1.0) / total_w for t in left}
        small = [t for t in left if left[t] < share[t]]
        if not small:
            targets.update(share)
            break
        for t in small:
            targets[t] = left.pop(t)
            cap -= targets[t]
    return targets


def _pct(values: list[float], q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if values else None


def tenant_stats(reqs: Sequence[TenantRequest], t0: float, t1: float,
                 censor_at: Optional[float] = None) -> dict[str, TenantStats]:
    """Per tenant: service in (t0, t1], demand of arrivals in it, TTFT p50/p99 of requests
    arriving in it.  A request with no first token counts as TTFT `censor_at - arrival`
    (a lower bound) when `censor_at` is given, else it is left out."""
    served = served_in_window(reqs, t0, t1)
    stats: dict[str, TenantStats] = {}
    for tenant in sorted({r.tenant for r in reqs}):
        mine = [r for r in reqs if r.tenant == tenant]
        inside = [r for r in mine if t0 < r.arrival_s <= t1]
        ttfts = []
        for r in inside:
            if r.ttft_s is not None:
                ttfts.append(r.ttft_s)
            elif censor_at is not None:
                ttfts.append(censor_at - r.arrival_s)
        p, o = served.get(tenant, (0, 0))
        stats[tenant] = TenantStats(len(mine), sum(1 for r in mine if r.token_times_s), p, o,
                                    sum(r.prompt_len + r.output_len for r in inside),
                                    _pct(ttfts, 50), _pct(ttfts, 99))
    return stats


def fairness_summary(stats: Mapping[str, TenantStats], weights: Mapping[str, float], window_s: float,
                     heavy: str, light: str) -> dict[str, Optional[float]]:
    """Served ratio heavy:light, the max-min target ratio, and their quotient (1 = exactly fair)."""
    capacity = float(sum(s.served for s in stats.values()))
    targets = max_min_targets(capacity, {t: float(s.demand) for t, s in stats.items()}, weights)
    h, li = stats.get(heavy), stats.get(light)
    ratio = h.served / li.served if h and li and li.served else None
    target = targets[heavy] / targets[light] if heavy in targets and light in targets and targets[light] else None
    return dict(served_ratio=ratio, target_ratio=target,
                ratio_vs_target=ratio / target if ratio is not None and target else None,
                served_tokens_per_s=capacity / window_s if window_s > 0 else None)
