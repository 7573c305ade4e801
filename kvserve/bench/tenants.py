"""Tenants and SLO classes in `kvserve bench serve` workloads (docs/scheduling.md).

  --tenants heavy:4,light:1      each request is given a tenant at random in these proportions
                                 (seeded), sent as the body's `tenant`; with Poisson arrivals at
                                 rate R, tenant t's arrivals are Poisson at R * share_t / sum(shares)
  --only-tenant light            send only that tenant's requests, at the same send times: the
                                 tenant alone, for the "TTFT when alone" baseline
  --slo-classes interactive:1:1000/100,batch:1:20000
                                 each request in a class at random (seeded), sent with
                                 `slo_ttft_ms` / `slo_tpot_ms` and `priority` = the class's
                                 position (the first class is 0, the most important)

The report adds, per tenant, requests, TTFT p50/p99 and the tokens served in a window (the
arrival window after a warm-up; kvserve.bench.fairness), with the max-min fair target ratio
for two tenants; per SLO class, the fraction meeting its own targets, and the goodput
(requests meeting their class's targets per second).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from kvserve.bench.client import RequestResult
from kvserve.bench.datasets import BenchRequest
from kvserve.bench.errors import BenchInputError
from kvserve.bench.fairness import TenantRequest, fairness_summary, tenant_stats


@dataclass(frozen=True, slots=True)
class SLOClass:
    name: str
    share: float
    ttft_ms: float
    tpot_ms: Optional[float] = None

    def met_by(self, r: RequestResult) -> bool:
        if not r.success or r.ttft_s is None or r.ttft_s * 1e3 > self.ttft_ms:
            return False
        tpot = r.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1e3 <= self.tpot_ms


def _positive(text: str, what: str, spec: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise BenchInputError(f"bad {what} {spec!r}: {text!r} is not a number") from None
    if not (v > 0 and np.isfinite(v)):
        raise BenchInputError(f"bad {what} {spec!r}: {text!r} must be > 0")
    return v


def parse_tenants(spec: str) -> list[tuple[str, float]]:
    """`heavy:4,light:1` -> [("heavy", 4.0), ("light", 1.0)]."""
    out: list[tuple[str, float]] = []
    for item in spec.split(","):
        name, sep, share = item.strip().partition(":")
        if not name or not sep:
            raise BenchInputError(f"bad --tenants item {item!r}: use NAME:SHARE, e.g. heavy:4,light:1")
        if name in (n for n, _ in out):
            raise BenchInputError(f"--tenants names tenant {name!r} twice")
        out.append((name, _positive(share, "--tenants item", item)))
    return out


def parse_slo_classes(spec: str) -> list[SLOClass]:
    """`interactive:1:1000/100,batch:1:20000` -> classes with share and TTFT[/TPOT] ms."""
    out: list[SLOClass] = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not parts[0]:
            raise BenchInputError(f"bad --slo-classes item {item!r}: use NAME:SHARE:TTFT_MS[/TPOT_MS]")
        name, share, targets = parts
        ttft, _, tpot = targets.partition("/")
        if name in (c.name for c in out):
            raise BenchInputError(f"--slo-classes names class {name!r} twice")
        out.append(SLOClass(name, _positive(share, "--slo-classes item", item),
                            _positive(ttft, "--slo-classes item", item),
                            _positive(tpot, "--slo-classes item", item) if tpot else None))
    return out


def _draw(names: Sequence[str], shares: Sequence[float], n: int, rng: np.random.Generator) -> list[str]:
    p = np.asarray(shares, dtype=np.float64)
    return [names[i] for i in rng.choice(len(names), size=n, p=p / p.sum())]


def assign(requests: Sequence[BenchRequest], tenants: Optional[str], slo_classes: Optional[str],
           seed: int) -> tuple[dict[int, str], dict[int, SLOClass]]:
    """Request index -> tenant, and -> SLO class (each drawn with its own seeded stream, so
    adding classes does not change which tenant a request belongs to)."""
    tenant_of: dict[int, str] = {}
    class_of: dict[int, SLOClass] = {}
    n = len(requests)
    if tenants:
        ts = parse_tenants(tenants)
        drawn = _draw([t for t, _ in ts], [s for _, s in ts], n, np.random.default_rng([seed, 7001]))
        tenant_of = {r.index: t for r, t in zip(requests, drawn)}
    if slo_classes:
        cs = parse_slo_classes(slo_classes)
        by_name = {c.name: c for c in cs}
        drawn = _draw([c.name for c in cs], [c.share for c in cs], n, np.random.default_rng([seed, 7002]))
        class_of = {r.index: by_name[c] for r, c in zip(requests, drawn)}
    return tenant_of, class_of


def body_fields(index: int, tenant_of: dict[int, str], class_of: dict[int, SLOClass],
                class_order: Sequence[str]) -> dict[str, Any]:
    """The scheduling fields of one request's body."""
    body: dict[str, Any] = {}
    if index in tenant_of:
        body["tenant"] = tenant_of[index]
    c = class_of.get(index)
    if c is not None:
        body["slo_ttft_ms"] = c.ttft_ms
        if c.tpot_ms is not None:
            body["slo_tpot_ms"] = c.tpot_ms
        body["priority"] = list(class_order).index(c.name)
    return body


def token_times(r: RequestResult) -> list[float]:
    """Arrival times of each output token event, since the run's start."""
    if r.ttft_s is None:
        return []
    t = r.start_s + r.ttft_s
    out = [t]
    for gap in r.itl_s:
        t += gap
        out.append(t)
    return out


def tenant_report(results: Sequence[RequestResult], requests: Sequence[BenchRequest], tenant_of: dict[int, str],
                  send_times: Sequence[float], warmup_fraction: float = 0.1,
                  weights: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Per tenant (module doc).  The window is (warm-up, last send time]: while every tenant
    is sending.  Requests are matched to results by index."""
    by_index = {q.index: q for q in requests}
    last = max(send_times) if send_times else 0.0
    t0, t1 = warmup_fraction * last, last
    reqs = [TenantRequest(tenant_of.get(r.index, "-"), r.scheduled_s, r.prompt_len, by_index[r.index].output_len,
                          token_times(r) if r.success else []) for r in results]
    stats = tenant_stats(reqs, t0, t1)
    doc: dict[str, Any] = dict(window_s=[t0, t1], tenants={})
    for t, s in stats.items():
        mine = [r for r in results if tenant_of.get(r.index, "-") == t]
        ttfts = [r.ttft_s for r in mine if r.success and r.ttft_s is not None]
        doc["tenants"][t] = dict(
            requests=s.requests, completed=sum(r.success for r in mine), served_prompt_tokens=s.served_prompt,
            served_output_tokens=s.served_output, demand_tokens=s.demand,
            ttft_p50_s=float(np.percentile(ttfts, 50)) if ttfts else None,
            ttft_p99_s=float(np.percentile(ttfts, 99)) if ttfts else None)
    if len(stats) == 2 and t1 > t0:
        heavy, light = sorted(stats, key=lambda t: -stats[t].requests)
        doc["fairness"] = dict(heavy=heavy, light=light,
                               **fairness_summary(stats, weights or {}, t1 - t0, heavy, light))
    return doc


def class_report(results: Sequence[RequestResult], class_of: dict[int, SLOClass], duration_s: float) -> dict[str, Any]:
    """Per SLO class: requests and the fraction meeting its targets; overall goodput."""
    classes: dict[str, dict[str, Any]] = {}
    good = 0
    for r in results:
        c = class_of.get(r.index)
        if c is None:
            continue
        row = classes.setdefault(c.name, dict(requests=0, met=0, ttft_ms=c.ttft_ms, tpot_ms=c.tpot_ms))
        row["requests"] += 1
        if c.met_by(r):
            row["met"] += 1
            good += 1
    for row in classes.values():
        row["met_fraction"] = row["met"] / row["requests"]
    n = sum(row["requests"] for row in classes.values())
    return dict(classes=classes, good_requests=good, slo_met_fraction=good / n if n else None,
                goodput_rps=good / duration_s if duration_s > 0 else None)


def report_rows(tenants: Optional[dict[str, Any]], classes: Optional[dict[str, Any]]) -> list[tuple[str, str]]:
    """Rows for the summary table."""
    rows: list[tuple[str, str]] = []
    if tenants:
        t0, t1 = tenants["window_s"]
        for t, s in tenants["tenants"].items():
            p50, p99 = s["ttft_p50_s"], s["ttft_p99_s"]
            ttft = "n/a" if p50 is None else f"{p50 * 1e3:.1f} / {p99 * 1e3:.1f}"
            rows.append((f"tenant {t}: requests / completed", f"{s['requests']} / {s['completed']}"))
            rows.append((f"tenant {t}: TTFT ms p50 / p99", ttft))
            rows.append((f"tenant {t}: served tokens in ({t0:.1f}, {t1:.1f}] s (prompt + output)",
                         f"{s['served_prompt_tokens']:,} + {s['served_output_tokens']:,}"))
        f = tenants.get("fairness")
        if f and f["served_ratio"] is not None:
            target = "n/a" if f["target_ratio"] is None else f"{f['target_ratio']:.2f}"
            rows.append((f"served {f['heavy']}:{f['light']} (max-min fair target)",
                         f"{f['served_ratio']:.2f} ({target})"))
    if classes:
        for name, c in classes["classes"].items():
            rows.append((f"SLO class {name}: met", f"{c['met']} / {c['requests']} ({c['met_fraction'] * 100:.1f} %)"))
        if classes["goodput_rps"] is not None:
            rows.append(("goodput (each request's class SLO)", f"{classes['goodput_rps']:.3f} req/s"))
    return rows
