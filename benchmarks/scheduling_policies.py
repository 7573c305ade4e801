"""Scheduling policies on real traces: goodput (SLO classes), fairness (two tenants), and
preemption by swap vs recompute (docs/scheduling.md has the tables and commands).

Engines (--engine):
  sim   the real scheduler, KV manager, policies and swap manager (EngineCore) driven by a
        cost-model executor on a simulated clock: step = base + per_token * tokens +
        per_ctx * decode context tokens (default: a Llama-3-8B-like model on one H100);
        swap copies cost bytes / link bandwidth.  Deterministic, seconds per run.
  real  LLMEngine on --model (the offline engine; arrivals replayed in wall-clock time).

Experiments (--experiment, default all):
  goodput   the Azure conversation trace and the BurstGPT sample, time-scaled (--calibrate:
            found by bisection) to a load where fcfs meets the SLO of about half the
            requests; mixed classes: interactive (TTFT 1 s, TPOT 100 ms) and batch (TTFT 20 s).
            Goodput = requests meeting their SLO per second, per policy, same workload.
  fairness  two tenants on the Azure lengths, "heavy" at 4x "light"'s Poisson rate, together past
            saturation, per light rate (--fair-light-rates: below its half of the capacity, and
            above it: both backlogged): tokens served per tenant in the arrival window against
            the max-min fair target (kvserve/bench/fairness.py), the light tenant's TTFT p50/p99
            under fcfs, fair and fair with --fair-weights, and alone (its same arrivals).
  swap      fcfs on a small KV pool (forced preemption): per preemption the stall (preempted ->
            its next token), tokens recomputed, copy time, latency and throughput with
            --preemption-mode recompute, swap, auto; swap and auto again on a slow host link.

Example (small, to check it works):
  python benchmarks/scheduling_policies.py --engine sim --num-requests 200
On a quiet machine with a model:
  python benchmarks/scheduling_policies.py --engine real --model smollm2-135m-instruct \\
      --num-requests 300 --interactive-slo 500/50 --batch-slo 10000 --result-file sched.json
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

# This checkout's kvserve, not an installed copy (`python benchmarks/...` puts benchmarks/ first
# on the path, and an editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvserve.bench.fairness import TenantRequest, fairness_summary, tenant_stats  # noqa: E402
from kvserve.bench.paths import shared_data_dir  # noqa: E402
from kvserve.bench.traces import TraceRecord, read_azure, read_burstgpt  # noqa: E402
from kvserve.config import parse_tenant_weights  # noqa: E402
from kvserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from kvserve.core.swap import PreemptionCostModel, SwapManager  # noqa: E402
from kvserve.engine.engine_core import EngineCore  # noqa: E402
from kvserve.protocol import ModelRunnerOutput, SampledToken, SchedulerOutput  # noqa: E402
from kvserve.request import SLO, Request  # noqa: E402
from kvserve.sampling_params import SamplingParams  # noqa: E402

POLICIES = ("fcfs", "priority", "fair", "slo")
VOCAB = 32000


@dataclass
class Item:
    arrival_s: float
    prompt_len: int
    output_len: int
    tenant: str = "t0"
    slo_class: str = "interactive"
    slo: Optional[SLO] = None
    priority: int = 0


@dataclass
class Result:
    arrival_s: float
    ttft_s: Optional[float]
    tpot_s: Optional[float]
    e2e_s: Optional[float]
    output_len: int
    tenant: str
    slo_class: str
    preemptions: int
    met: bool
    token_times_s: tuple[float, ...] = ()  # when each output token was produced (run clock)


# ------------------------------------------------------------------------ workloads
def parse_slo(text: str) -> SLO:
    ttft, _, tpot = text.partition("/")
    return SLO(ttft_s=float(ttft) / 1000, tpot_s=float(tpot) / 1000 if tpot else None)


def trace_items(name: str, n: int, max_len: int, args: argparse.Namespace) -> list[Item]:
    root = shared_data_dir() / "traces"
    records: list[TraceRecord] = (read_azure(root / "azure" / "AzureLLMInferenceTrace_conv.csv") if name == "azure"
                                  else read_burstgpt(root / "burstgpt" / "burstgpt_sample.csv"))
    if len(records) < n:
        # A short sample (BurstGPT's has 54 rows) is tiled, each copy after the previous one.
        span = (records[-1].timestamp_s or 0.0) + 1.0
        records = [TraceRecord((r.timestamp_s or 0.0) + k * span, r.input_len, r.output_len)
                   for k in range(-(-n // len(records))) for r in records]
    rng = random.Random(args.seed)
    inter, batch = parse_slo(args.interactive_slo), parse_slo(args.batch_slo)
    items = []
    for r in records[:n]:
        p = max(1, min(r.input_len, max_len // 2))
        o = max(1, min(r.output_len, max_len - p - 1, args.max_output_len))
        interactive = rng.random() < args.interactive_fraction
        # Interactive requests get priority 0 (first) under the `priority` policy.
        items.append(Item(r.timestamp_s or 0.0, p, o, slo_class="interactive" if interactive else "batch",
                          slo=inter if interactive else batch, priority=0 if interactive else 1))
    return items


def scaled(items: list[Item], factor: float) -> list[Item]:
    """Arrival times multiplied by `factor` (< 1: a higher load)."""
    return [Item(i.arrival_s * factor, i.prompt_len, i.output_len, i.tenant, i.slo_class, i.slo, i.priority)
            for i in items]


def two_tenants(base: list[Item], rate: float, ratio: float, duration_s: float, seed: int) -> list[Item]:
    """Poisson arrivals: tenant "heavy" at ratio * rate, "light" at rate; lengths drawn from base."""
    rng = random.Random(seed)
    items: list[Item] = []
    for tenant, r in (("heavy", ratio * rate), ("light", rate)):
        if r <= 0:
            continue
        t = 0.0
        while True:
            t += rng.expovariate(r)
            if t > duration_s:
                break
            b = rng.choice(base)
            items.append(Item(t, b.prompt_len, b.output_len, tenant=tenant, slo_class="batch", slo=None))
    return sorted(items, key=lambda i: i.arrival_s)


# --------------------------------------------------------------------- sim engine
@dataclass
class SimClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class SimExecutor:
    clock: SimClock
    base_s: float
    per_token_s: float
    per_ctx_s: float
    swap_block_s: float
    busy_s: float = 0.0
    swap_s: float = 0.0
    token_times: dict[str, list[float]] = field(default_factory=dict)  # request id -> output token times
    preempted_at: dict[str, list[float]] = field(default_factory=dict)  # request id -> its preemption times
    tokens_computed: int = 0  # every batched token, recomputations included
    blocks_copied: int = 0  # swap-outs + swap-ins

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        for rid in step.preempted_ids:
            self.preempted_at.setdefault(rid, []).append(self.clock.now)
        copies = sum(len(c.block_ids) for c in step.swap_outs + step.swap_ins)
        self.blocks_copied += copies
        self.tokens_computed += step.num_batched_tokens
        dt = copies * self.swap_block_s
        self.swap_s += dt
        if step.requests:
            ctx = sum(r.start_pos for r in step.requests if len(r.token_ids) == 1)
            dt += self.base_s + self.per_token_s * step.num_batched_tokens + self.per_ctx_s * ctx
        self.clock.now += dt
        self.busy_s += dt
        for r in step.requests:
            if r.sample:
                self.token_times.setdefault(r.request_id, []).append(self.clock.now)
        return ModelRunnerOutput(sampled={r.request_id: [SampledToken(5)] for r in step.requests if r.sample})


def sim_core(args: argparse.Namespace, policy: str, mode: str, num_blocks: int) -> tuple[EngineCore, SimClock]:
    clock = SimClock()
    bs = args.block_size
    sc = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                         max_model_len=args.max_model_len, policy=policy, tenant_weights=args.tenant_weights,
                         preemption_mode=mode, slo_reject=args.slo_reject)
    config = EngineConfig(model=ModelConfig(model="sim"), cache=CacheConfig(block_size=bs, num_kv_blocks=num_blocks),
                          scheduler=sc)
    block_bytes = int(args.sim_kv_bytes_per_token * bs)
    swap = None
    if mode != "recompute":
        cost = PreemptionCostModel(block_bytes, bs, args.sim_link_gbs * 1e9, 2 * args.sim_params,
                                   args.sim_peak_tflops * 1e12)
        swap = SwapManager(int(args.swap_space * 1024**3) // block_bytes, mode, cost)
    ex = SimExecutor(clock, args.sim_base_ms / 1000, args.sim_token_us / 1e6, args.sim_ctx_ns / 1e9,
                     block_bytes / (args.sim_link_gbs * 1e9))
    core = EngineCore(config, ex, num_kv_blocks=num_blocks, vocab_size=VOCAB, clock=clock, swap=swap)
    return core, clock


def run_sim(items: list[Item], args: argparse.Namespace, policy: str, mode: str = "recompute",
            num_blocks: Optional[int] = None, stop_at: Optional[float] = None) -> tuple[list[Result], float]:
    """Every request to completion, or (stop_at) until the simulated clock passes it."""
    core, clock = sim_core(args, policy, mode, num_blocks or args.num_kv_blocks)
    return drive(core, clock, items, stop_at)


def drive(core: EngineCore, clock: SimClock, items: list[Item],
          stop_at: Optional[float] = None) -> tuple[list[Result], float]:
    reqs: list[tuple[Item, Request]] = []
    pending = list(items)
    i = 0
    while (i < len(pending) or core.has_unfinished()) and (stop_at is None or clock.now <= stop_at):
        while i < len(pending) and pending[i].arrival_s <= clock.now:
            it = pending[i]
            rng = random.Random(i)
            r = core.make_request(str(i), [rng.randrange(10, VOCAB) for _ in range(it.prompt_len)],
                                  SamplingParams(max_tokens=it.output_len, ignore_eos=True), arrival_time=it.arrival_s,
                                  priority=it.priority, tenant=it.tenant, slo=it.slo)
            try:
                core.add_request(r)
                reqs.append((it, r))
            except ValueError:
                reqs.append((it, r))  # rejected (slo --slo-reject): counts as missed
            i += 1
        if not core.has_unfinished():
            clock.now = max(clock.now, pending[i].arrival_s)
            continue
        core.step()
    assert isinstance(core.executor, SimExecutor)
    times = core.executor.token_times
    return [result(it, r.first_token_time, r.finish_time, r.num_output_tokens, r.num_preemptions,
                   tuple(times.get(r.request_id, ()))) for it, r in reqs], clock.now


# -------------------------------------------------------------------- real engine
def run_real(items: list[Item], args: argparse.Namespace, policy: str, mode: str = "recompute",
             num_blocks: Optional[int] = None) -> tuple[list[Result], float]:
    from kvserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(args.model, scheduling_policy=policy, preemption_mode=mode, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, tenant_weights=args.tenant_weights,
                       num_kv_blocks=num_blocks or args.real_num_kv_blocks, device=args.device, dtype=args.dtype,
                       slo_reject=args.slo_reject, swap_space=args.swap_space)
    vocab = engine.core.vocab_size
    t0 = time.time()
    outs: dict[str, Any] = {}
    times: dict[str, list[float]] = {}  # request id -> output token times (since t0)
    ids: list[tuple[Item, str]] = []
    i = 0
    try:
        while i < len(items) or engine.has_unfinished_requests():
            now = time.time() - t0
            while i < len(items) and items[i].arrival_s <= now:
                it = items[i]
                rng = random.Random(i)
                prompt = {"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(it.prompt_len)]}
                try:
                    rid = engine.add_request(prompt, SamplingParams(max_tokens=it.output_len, ignore_eos=True),
                                             arrival_time=t0 + it.arrival_s, priority=it.priority,
                                             tenant=it.tenant, slo=it.slo)
                    ids.append((it, rid))
                except ValueError:
                    ids.append((it, ""))
                i += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, min(0.01, items[i].arrival_s - now)) if i < len(items) else 0)
                continue
            for out in engine.step():
                got = times.setdefault(out.request_id, [])
                now = time.time() - t0
                got.extend([now] * (len(out.outputs[0].token_ids) - len(got)))
                if out.finished:
                    outs[out.request_id] = out
    finally:
        engine.close()
    results = []
    for it, rid in ids:
        o = outs.get(rid)
        if o is None:
            results.append(result(it, None, None, 0, 0))
            continue
        m = o.metrics
        results.append(result(it, m.first_token_time and m.first_token_time - t0, m.finish_time and m.finish_time - t0,
                              len(o.outputs[0].token_ids), m.num_preemptions, tuple(times.get(rid, ()))))
    return results, time.time() - t0


def result(it: Item, first: Optional[float], finish: Optional[float], n_out: int, preemptions: int,
           token_times: tuple[float, ...] = ()) -> Result:
    ttft = None if first is None else first - it.arrival_s
    tpot = (finish - first) / (n_out - 1) if first is not None and finish is not None and n_out > 1 else None
    met = ttft is not None and n_out == it.output_len
    if met and it.slo is not None:
        met = (it.slo.ttft_s is None or ttft <= it.slo.ttft_s) and (  # type: ignore[operator]
            it.slo.tpot_s is None or tpot is None or tpot <= it.slo.tpot_s)
    return Result(it.arrival_s, ttft, tpot, None if finish is None else finish - it.arrival_s, n_out, it.tenant,
                  it.slo_class, preemptions, met, token_times)


# ---------------------------------------------------------------------- summaries
def pct(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(results: list[Result], duration_s: float) -> dict[str, Any]:
    met = sum(r.met for r in results)
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    by_class = {c: sum(r.met for r in results if r.slo_class == c) / max(1, sum(r.slo_class == c for r in results))
                for c in sorted({r.slo_class for r in results})}
    return dict(requests=len(results), slo_met=met, slo_met_fraction=met / max(1, len(results)),
                goodput_rps=met / duration_s if duration_s else 0.0, duration_s=duration_s,
                ttft_p50_s=pct(ttfts, 0.5), ttft_p99_s=pct(ttfts, 0.99), met_by_class=by_class,
                preempted=sum(r.preemptions > 0 for r in results),
                output_tokens_per_s=sum(r.output_len for r in results) / duration_s if duration_s else 0.0)


def run(items: list[Item], args: argparse.Namespace, policy: str, mode: str = "recompute",
        num_blocks: Optional[int] = None) -> tuple[list[Result], float]:
    fn = run_sim if args.engine == "sim" else run_real
    return fn(items, args, policy, mode, num_blocks)


def calibrate(items: list[Item], args: argparse.Namespace, target: float = 0.5) -> float:
    """The time scale at which fcfs meets about `target` of the SLOs (bisection on log scale)."""
    lo, hi = 1e-7, 1.0  # smaller = more load
    for _ in range(args.calibration_steps):
        mid = (lo * hi) ** 0.5
        res, dur = run(scaled(items, mid), args, "fcfs")
        frac = summary(res, dur)["slo_met_fraction"]
        print(f"  calibrate: time scale {mid:.4g}: fcfs meets {frac:.0%}", flush=True)
        if frac < target:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


def goodput_experiment(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for trace in args.goodput_traces:
        items = trace_items(trace, args.num_requests, args.max_model_len, args)
        scale = args.time_scale if args.time_scale else calibrate(items, args)
        load = scaled(items, scale)
        rows = {}
        for policy in POLICIES:
            res, dur = run(load, args, policy)
            rows[policy] = summary(res, dur)
        base = rows["fcfs"]["goodput_rps"]
        print(f"\n### goodput: {trace} ({len(load)} requests, time scale {scale:.4g})\n")
        print("| policy | SLO met | interactive met | batch met | goodput (req/s) | vs fcfs | TTFT p50 | TTFT p99 |")
        print("|---|---|---|---|---|---|---|---|")
        for policy, s in rows.items():
            mc = s["met_by_class"]
            print(f"| {policy} | {s['slo_met_fraction']:.0%} | {mc.get('interactive', 0):.0%} | "
                  f"{mc.get('batch', 0):.0%} | {s['goodput_rps']:.3f} | {s['goodput_rps'] / base if base else 0:.2f}x"
                  f" | {s['ttft_p50_s'] or 0:.2f} s | {s['ttft_p99_s'] or 0:.2f} s |")
        out[trace] = dict(time_scale=scale, policies=rows)
    return out


def tenant_requests(items: list[Item], res: list[Result]) -> list[TenantRequest]:
    return [TenantRequest(it.tenant, it.arrival_s, it.prompt_len, it.output_len, r.token_times_s)
            for it, r in zip(items, res)]


def fairness_run(items: list[Item], args: argparse.Namespace, policy: str, weights: Optional[str],
                 t0: float, t1: float) -> dict[str, Any]:
    """One run; service in (t0, t1], TTFT of arrivals in it (censored at the end of the run)."""
    saved = args.tenant_weights
    args.tenant_weights = weights
    try:
        fn = run_sim if args.engine == "sim" else run_real
        kw = dict(stop_at=t1 + args.fair_drain_s) if args.engine == "sim" else {}
        res, end = fn(items, args, policy, **kw)  # type: ignore[operator]
    finally:
        args.tenant_weights = saved
    stats = tenant_stats(tenant_requests(items, res), t0, t1, censor_at=end)
    w = parse_tenant_weights(weights) if weights else {}
    return dict(policy=policy, weights=weights or "equal", tenants={t: asdict(s) for t, s in stats.items()},
                **fairness_summary(stats, w, t1 - t0, "heavy", "light"))


def fairness_experiment(args: argparse.Namespace) -> dict[str, Any]:
    """Per light-tenant rate (heavy at 4x): the light tenant alone, then both under fcfs, fair
    and fair with --fair-weights.  Service is measured in (warm-up, duration]."""
    base = trace_items("azure", 2000, args.max_model_len, args)
    t0, t1 = args.fair_warmup_s, args.fair_duration_s
    out: dict[str, Any] = {}
    for rate in args.fair_light_rates:
        items = two_tenants(base, rate, 4.0, t1, args.seed)
        alone = [i for i in items if i.tenant == "light"]  # the same arrivals, heavy removed
        a = fairness_run(alone, args, "fcfs", None, t0, t1)
        alone_p50 = a["tenants"]["light"]["ttft_p50_s"]
        rows = [fairness_run(items, args, "fcfs", None, t0, t1), fairness_run(items, args, "fair", None, t0, t1)]
        for w in args.fair_weights or ():
            rows.append(fairness_run(items, args, "fair", w, t0, t1))
        out[f"light_{rate:g}"] = dict(alone=a, runs=rows)
        print(f"\n### fairness: light tenant at {rate:g} req/s, heavy at {4 * rate:g} req/s, Azure conv lengths; "
              f"service in ({t0:g}, {t1:g}] s\n")
        print(f"light alone: TTFT p50 {alone_p50 or 0:.3f} s, p99 {a['tenants']['light']['ttft_p99_s'] or 0:.3f} s; "
              f"light demand {a['tenants']['light']['demand'] / (t1 - t0):.0f} tok/s, "
              f"served alone {a['served_tokens_per_s'] or 0:.0f} tok/s\n")
        print("| policy | weights | served tok/s | heavy:light served | max-min target | served / target "
              "| light TTFT p50 | p50 vs alone | light TTFT p99 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            lt = r["tenants"]["light"]
            vs = (lt["ttft_p50_s"] or 0) / alone_p50 if alone_p50 else 0
            print(f"| {r['policy']} | {r['weights']} | {r['served_tokens_per_s'] or 0:.0f} | {r['served_ratio'] or 0:.2f} "
                  f"| {r['target_ratio'] or 0:.2f} | {r['ratio_vs_target'] or 0:.2f} | {lt['ttft_p50_s'] or 0:.3f} s "
                  f"| {vs:.2f}x | {lt['ttft_p99_s'] or 0:.3f} s |", flush=True)
    return out


def preemption_stalls(ex: SimExecutor) -> list[float]:
    """Per preemption: from the step that preempted the request to its next output token
    (the wait to be resumed plus the recompute or swap-in): what the preemption cost it."""
    stalls = []
    for rid, times in ex.preempted_at.items():
        tokens = ex.token_times.get(rid, [])
        for t in times:
            after = [x for x in tokens if x > t]
            if after:
                stalls.append(after[0] - t)
    return stalls


def swap_run(items: list[Item], args: argparse.Namespace, mode: str, blocks: int, link_gbs: float) -> dict[str, Any]:
    saved = args.sim_link_gbs
    args.sim_link_gbs = link_gbs
    try:
        core, clock = sim_core(args, "fcfs", mode, blocks)
        res, dur = drive(core, clock, items)
    finally:
        args.sim_link_gbs = saved
    ex = core.executor
    assert isinstance(ex, SimExecutor)
    stalls = preemption_stalls(ex)
    ideal = sum(it.prompt_len + it.output_len - 1 for it in items)
    pre = [r for r in res if r.preemptions]
    by = core.scheduler.preemptions_by
    return dict(mode=mode, link_gbs=link_gbs, preempted_requests=len(pre),
                preemptions={f"{c}/{m}": n for (c, m), n in by.items()},
                swapped=sum(n for (_, m), n in by.items() if m == "swap"),
                stall_mean_s=statistics.fmean(stalls) if stalls else None, stall_p50_s=pct(stalls, 0.5),
                stall_p90_s=pct(stalls, 0.9),
                preempted_e2e_mean_s=statistics.fmean([r.e2e_s for r in pre if r.e2e_s is not None]) if pre else None,
                e2e_mean_s=statistics.fmean([r.e2e_s for r in res if r.e2e_s is not None]),
                recomputed_tokens=ex.tokens_computed - ideal, blocks_copied=ex.blocks_copied, copy_s=ex.swap_s,
                output_tokens_per_s=summary(res, dur)["output_tokens_per_s"], duration_s=dur)


def swap_experiment(args: argparse.Namespace) -> dict[str, Any]:
    """fcfs on a small KV pool (forced preemption), per mode; auto also on a slow host link,
    where its cost model should pick recompute for short contexts."""
    if args.engine != "sim":
        raise SystemExit("--experiment swap runs on --engine sim (the real engine's swap needs a GPU host link; "
                         "measure it with `kvserve serve --preemption-mode ...` and `kvserve bench serve`)")
    items = scaled(trace_items("azure", args.num_requests, args.max_model_len, args), args.swap_time_scale)
    blocks = args.swap_num_kv_blocks
    runs = [swap_run(items, args, m, blocks, args.sim_link_gbs) for m in ("recompute", "swap", "auto")]
    runs += [swap_run(items, args, m, blocks, args.swap_slow_link_gbs) for m in ("swap", "auto")]
    print(f"\n### preemption: {len(items)} Azure conv requests (time scale {args.swap_time_scale:g}), fcfs, "
          f"{blocks} KV blocks of {args.block_size} tokens\n")
    print("| mode | host link | preempted requests | preemptions (by swap) | stall per preemption mean / p50 / p90 "
          "| tokens recomputed | copy time | preempted requests' mean e2e | all mean e2e | output tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        n = sum(r["preemptions"].values())
        print(f"| {r['mode']} | {r['link_gbs']:g} GB/s | {r['preempted_requests']} | {n} ({r['swapped']}) | "
              f"{r['stall_mean_s'] or 0:.2f} / {r['stall_p50_s'] or 0:.2f} / {r['stall_p90_s'] or 0:.2f} s | "
              f"{r['recomputed_tokens']:,} | {r['copy_s']:.2f} s | {r['preempted_e2e_mean_s'] or 0:.2f} s | "
              f"{r['e2e_mean_s']:.2f} s | {r['output_tokens_per_s']:.0f} |", flush=True)
    return dict(runs=runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("sim", "real"), default="sim")
    p.add_argument("--experiment", choices=("goodput", "fairness", "swap", "all"), default="all")
    p.add_argument("--model", default=None, help="real: model dir, .gguf or built-in name")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-requests", type=int, default=400)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-output-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=8192, help="sim: KV pool (default ~131k tokens)")
    p.add_argument("--real-num-kv-blocks", type=int, default=None, help="real: KV pool (default: memory budget)")
    p.add_argument("--goodput-traces", nargs="+", choices=("azure", "burstgpt"), default=["azure", "burstgpt"])
    p.add_argument("--interactive-slo", default="1000/100", help="TTFT_MS/TPOT_MS of the interactive class")
    p.add_argument("--batch-slo", default="20000", help="TTFT_MS[/TPOT_MS] of the batch class")
    p.add_argument("--interactive-fraction", type=float, default=0.5)
    p.add_argument("--slo-reject", action="store_true")
    p.add_argument("--time-scale", type=float, default=None, help="skip calibration: multiply arrival times by this")
    p.add_argument("--calibration-steps", type=int, default=12)
    p.add_argument("--tenant-weights", default=None)
    p.add_argument("--fair-light-rates", type=float, nargs="+", default=[3.0, 9.0],
                   help="light tenant's requests/s, one experiment each (heavy: 4x); the default sim serves about "
                        "12 req/s, so 3 leaves the light tenant below its half, 9 above it (both backlogged)")
    p.add_argument("--fair-duration-s", type=float, default=60.0, help="arrival window")
    p.add_argument("--fair-warmup-s", type=float, default=10.0, help="service is measured after this")
    p.add_argument("--fair-drain-s", type=float, default=10.0,
                   help="sim: keep running this long after the arrival window (then stop: TTFTs still open count "
                        "as lower bounds)")
    p.add_argument("--fair-weights", nargs="*", default=["heavy=2"],
                   help="extra fair runs with these --tenant-weights (default: heavy=2)")
    p.add_argument("--swap-time-scale", type=float, default=0.05, help="swap: arrival times times this")
    p.add_argument("--swap-slow-link-gbs", type=float, default=2.0,
                   help="swap: also run swap and auto with this host link (GB/s)")
    p.add_argument("--swap-num-kv-blocks", type=int, default=1024, help="sim: small pool for the swap experiment")
    p.add_argument("--real-swap-num-kv-blocks", type=int, default=128)
    p.add_argument("--swap-space", type=float, default=4.0, help="GiB of host swap space")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None)
    g = p.add_argument_group("sim cost model (default: ~Llama-3-8B bf16 on one H100)")
    g.add_argument("--sim-base-ms", type=float, default=6.0, help="fixed cost per step (weights read)")
    g.add_argument("--sim-token-us", type=float, default=35.0, help="per batched token (matmuls)")
    g.add_argument("--sim-ctx-ns", type=float, default=40.0, help="per decode context token (KV read)")
    g.add_argument("--sim-kv-bytes-per-token", type=float, default=131072)
    g.add_argument("--sim-link-gbs", type=float, default=64.0, help="host link, GB/s")
    g.add_argument("--sim-params", type=float, default=8e9)
    g.add_argument("--sim-peak-tflops", type=float, default=989.0)
    args = p.parse_args()
    if args.engine == "real" and not args.model:
        p.error("--engine real needs --model")
    report: dict[str, Any] = dict(args=vars(args))
    if args.experiment in ("goodput", "all"):
        report["goodput"] = goodput_experiment(args)
    if args.experiment in ("fairness", "all"):
        report["fairness"] = fairness_experiment(args)
    if args.experiment == "swap" or (args.experiment == "all" and args.engine == "sim"):
        report["swap"] = swap_experiment(args)
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
