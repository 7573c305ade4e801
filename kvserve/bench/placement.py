"""Prefill/decode placement on paper: DistServe's search (Zhong et al., OSDI'24, Algorithm 1, high
node affinity) over the roofline bounds of roofline.py.

For a workload (prompt length P, output length O, arrival rate R requests/s) and latency targets
(TTFT, TPOT), find how many prefill and decode instances, and how many GPUs each (tensor
parallelism t, assumed ideal: t times the FLOP/s, bandwidth and memory of one GPU), serve R at
the targets with the fewest GPUs, i.e. the most goodput per GPU.

Per-instance goodput (the highest rate one instance sustains within the targets):
  * prefill, served one prompt at a time (a long prompt saturates the GPU, batching gains
    nothing), arrivals Poisson: an M/D/1 queue with service time D = roofline prefill time of P
    tokens.  TTFT = D + X + R_i D^2 / (2 (1 - R_i D)), with X = the prompt's KV bytes / link
    bandwidth (the decode instance streams the first token after the transfer).  Solving
    TTFT <= target for R_i:  R_i <= 2W / (D (D + 2W)),  W = target - D - X.
    The link also caps R_i at bandwidth / KV bytes of one prompt.
  * decode: a batch of B requests steps in S(B) = roofline decode step at the mean context
    P + O/2; TPOT = S(B).  The largest B with S(B) <= target, that fits in memory at the full
    context P + O, gives the most throughput; by Little's law the instance then completes
    B / (O * S(B)) requests per second.
Then n_p = ceil(R / goodput_p), n_d = ceil(R / goodput_d) for each pair of parallelism choices,
and the pair with the fewest GPUs wins (ties: fewer instances, then lower parallelism).

Everything is a lower bound on cost (perfect kernels, ideal parallelism, mean latencies rather
than a percentile), so real deployments need at least this many GPUs.  Costs are passed in as
functions, so tests check the search with hand-made ones.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

from kvserve.bench import roofline as rl

PrefillTime = Callable[[int], float]  # tensor parallelism -> seconds for one prompt
DecodeStep = Callable[[int, int], float]  # (tensor parallelism, batch) -> seconds per step
MaxBatch = Callable[[int], int]  # tensor parallelism -> requests that fit at the full context


@dataclass(frozen=True, slots=True)
class PhaseCosts:
    prefill_s: PrefillTime
    decode_step_s: DecodeStep
    max_batch: MaxBatch
    kv_bytes_per_request: float  # the prompt's KV, moved from the prefill to the decode instance


@dataclass(frozen=True, slots=True)
class Targets:
    ttft_s: float
    tpot_s: float
    output_len: int
    link_bandwidth: Optional[float] = None  # bytes/s; None: the transfer is not modelled

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError("the TTFT and TPOT targets must be > 0")
        if self.output_len < 1:
            raise ValueError("the output length must be >= 1")
        if self.link_bandwidth is not None and not self.link_bandwidth > 0:
            raise ValueError("the link bandwidth must be > 0")


@dataclass(frozen=True, slots=True)
class PrefillGoodput:
    tp: int
    prefill_s: float
    transfer_s: float
    rate: float  # requests/s one instance serves within the TTFT target (0: never)
    limited_by: str  # "ttft" | "link" | "memory" | "infeasible"


@dataclass(frozen=True, slots=True)
class DecodeGoodput:
    tp: int
    batch: int  # requests decoding together (0: none fits the target)
    step_s: float
    rate: float  # requests/s one instance completes within the TPOT target
    limited_by: str  # "tpot" | "memory" | "infeasible"


@dataclass(frozen=True, slots=True)
class Placement:
    rate: float
    prefill: PrefillGoodput
    decode: DecodeGoodput
    num_prefill: int
    num_decode: int

    @property
    def gpus(self) -> int:
        return self.num_prefill * self.prefill.tp + self.num_decode * self.decode.tp

    @property
    def goodput_per_gpu(self) -> float:
        return self.rate / self.gpus

    def as_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "num_prefill": self.num_prefill, "prefill_tp": self.prefill.tp,
                "num_decode": self.num_decode, "decode_tp": self.decode.tp, "gpus": self.gpus,
                "goodput_per_gpu": self.goodput_per_gpu, "prefill": asdict(self.prefill),
                "decode": asdict(self.decode)}


def prefill_goodput(costs: PhaseCosts, targets: Targets, tp: int) -> PrefillGoodput:
    """The most requests/s one prefill instance of `tp` GPUs serves within the TTFT target."""
    d = costs.prefill_s(tp)
    x = costs.kv_bytes_per_request / targets.link_bandwidth if targets.link_bandwidth else 0.0
    if costs.max_batch(tp) < 1:
        return PrefillGoodput(tp, d, x, 0.0, "memory")
    slack = targets.ttft_s - d - x
    if slack <= 0:
        return PrefillGoodput(tp, d, x, 0.0, "infeasible")
    rate, limit = 2.0 * slack / (d * (d + 2.0 * slack)), "ttft"
    if targets.link_bandwidth and costs.kv_bytes_per_request > 0:
        link_rate = targets.link_bandwidth / costs.kv_bytes_per_request
        if link_rate < rate:
            rate, limit = link_rate, "link"
    return PrefillGoodput(tp, d, x, rate, limit)


def decode_goodput(costs: PhaseCosts, targets: Targets, tp: int) -> DecodeGoodput:
    """The most requests/s one decode instance of `tp` GPUs completes within the TPOT target."""
    cap = costs.max_batch(tp)
    if cap < 1:
        return DecodeGoodput(tp, 0, 0.0, 0.0, "memory")
    if costs.decode_step_s(tp, 1) > targets.tpot_s:
        return DecodeGoodput(tp, 0, costs.decode_step_s(tp, 1), 0.0, "infeasible")
    # Step time grows with the batch: the largest batch within the target (binary search).
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if costs.decode_step_s(tp, mid) <= targets.tpot_s:
            lo = mid
        else:
            hi = mid - 1
    step = costs.decode_step_s(tp, lo)
    return DecodeGoodput(tp, lo, step, lo / (targets.output_len * step), "memory" if lo == cap else "tpot")


def place(costs: PhaseCosts, targets: Targets, rate: float, tp_options: Sequence[int] = (1,)) -> Optional[Placement]:
    """The placement serving `rate` requests/s with the fewest GPUs, or None if no option can."""
    if not rate > 0:
        raise ValueError(f"the request rate must be > 0, got {rate}")
    prefills = [g for g in (prefill_goodput(costs, targets, t) for t in tp_options) if g.rate > 0]
    decodes = [g for g in (decode_goodput(costs, targets, t) for t in tp_options) if g.rate > 0]
    best: Optional[Placement] = None
    for p in prefills:
        for d in decodes:
            cand = Placement(rate, p, d, _instances(rate, p.rate), _instances(rate, d.rate))
            if best is None or _key(cand) < _key(best):
                best = cand
    return best


def best_ratio(costs: PhaseCosts, targets: Targets, tp_options: Sequence[int] = (1,)) -> Optional[tuple[float, PrefillGoodput, DecodeGoodput]]:
    """At large rates (instance counts no longer rounded up): the most goodput per GPU,
    1 / (tp_p / goodput_p + tp_d / goodput_d), and the phases that reach it; None if none can."""
    best = None
    for t_p in tp_options:
        p = prefill_goodput(costs, targets, t_p)
        for t_d in tp_options:
            d = decode_goodput(costs, targets, t_d)
            if p.rate > 0 and d.rate > 0:
                per_gpu = 1.0 / (p.tp / p.rate + d.tp / d.rate)
                if best is None or per_gpu > best[0]:
                    best = (per_gpu, p, d)
    return best


def _instances(rate: float, per_instance: float) -> int:
    # A rate that is an exact multiple needs exactly that many (no float slack adds one).
    return max(1, math.ceil(rate / per_instance - 1e-9))


def _key(p: Placement) -> tuple[int, int, int]:
    return (p.gpus, p.num_prefill + p.num_decode, p.prefill.tp + p.decode.tp)


# ----------------------------------------------------------------------------- roofline costs


def roofline_costs(m: rl.ModelSpec, hw: rl.HardwareSpec, prompt_len: int, output_len: int,
                   w_bytes: float = 2, kv_bytes: Optional[float] = None) -> PhaseCosts:
    """Phase costs from the roofline bounds; `tp` GPUs act as one GPU with t times everything."""
    kvb = w_bytes if kv_bytes is None else kv_bytes
    mean_context = prompt_len + output_len // 2

    def scaled(tp: int) -> rl.HardwareSpec:
        return rl.HardwareSpec(f"{tp}x {hw.name}", hw.peak_flops * tp, hw.mem_bandwidth * tp, hw.mem_bytes * tp)

    return PhaseCosts(
        prefill_s=lambda tp: rl.prefill_bound(m, scaled(tp), prompt_len, w_bytes, kvb).time_s,
        decode_step_s=lambda tp, b: rl.decode_step_bound(m, scaled(tp), b, mean_context, w_bytes, kvb).time_s,
        max_batch=lambda tp: rl.max_concurrent_requests(m, scaled(tp), prompt_len + output_len, w_bytes, kvb),
        kv_bytes_per_request=prompt_len * m.kv_bytes_per_token(kvb),
    )


def placement_rows(costs: PhaseCosts, targets: Targets, rates: Sequence[float],
                   tp_options: Sequence[int]) -> tuple[list[tuple[str, str]], list[Optional[Placement]]]:
    """(label, value) rows for the table, and the placements (None where no option serves the rate)."""
    rows: list[tuple[str, str]] = []
    for t in tp_options:
        p, d = prefill_goodput(costs, targets, t), decode_goodput(costs, targets, t)
        rows.append((f"prefill instance, tp {t}",
                     f"{p.rate:.3f} req/s ({p.limited_by}; prefill {rl.format_seconds(p.prefill_s)}, "
                     f"transfer {rl.format_seconds(p.transfer_s)})"))
        rows.append((f"decode instance, tp {t}",
                     f"{d.rate:.3f} req/s ({d.limited_by}; batch {d.batch}, step {rl.format_seconds(d.step_s)})"))
    asym = best_ratio(costs, targets, tp_options)
    if asym is not None:
        per_gpu, p, d = asym
        rows.append(("best goodput per GPU (large rates)",
                     f"{per_gpu:.3f} req/s per GPU at {d.rate / p.rate:.2f} prefill (tp {p.tp}) per decode "
                     f"(tp {d.tp}) instance"))
    placements = [place(costs, targets, r, tp_options) for r in rates]
    for r, pl in zip(rates, placements):
        if pl is None:
            rows.append((f"rate {r:g} req/s", "no placement meets the targets"))
            continue
        rows.append((f"rate {r:g} req/s",
                     f"{pl.num_prefill} prefill (tp {pl.prefill.tp}) : {pl.num_decode} decode (tp {pl.decode.tp}) "
                     f"= {pl.gpus} GPUs, {pl.goodput_per_gpu:.3f} req/s per GPU"))
    return rows, placements
