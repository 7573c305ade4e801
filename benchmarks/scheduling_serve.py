"""Issue 18's measurements on a real server: fairness, goodput and swap vs recompute, each run a
`kvserve bench serve` against a fresh `kvserve serve` (docs/scheduling.md has the tables).

Model: the built-in SmolLM2-135M-Instruct (`kvserve serve` with no model), --max-num-seqs 16,
prefix caching off (the runs send the same token-id prompts, so a server kept between runs would
otherwise hit its cache), Azure conversation lengths x --length-scale (0.1: prompts ~94, outputs
~26 tokens).  Every size derives from the capacity C (req/s, all requests at once on the fcfs
server), so the wall time barely depends on the machine: about 13 minutes on 2 cores with the
defaults (the plan and its estimate are printed once C is known).

  0. capacity     fcfs: --capacity-prompts requests at rate inf -> C.
  1. fairness     two tenants, heavy:4,light:1 (body field `tenant`), Poisson at R = load x C,
                  past saturation, N = R x window: at --low-load (light at R/5 below its share,
                  also at weight 2 for heavy) and at --high-load (both backlogged), under fcfs,
                  fair, fair --tenant-weights heavy=2; light alone (--only-tenant light, same
                  send times) at the low load.  Per run: served tokens heavy:light against the
                  max-min fair target, light TTFT p50/p99, p50 vs alone.
  2. goodput      Azure conversation trace (N = --goodput-load x C x window) and the BurstGPT
                  sample (its 54 rows), --replay-timestamps at a time scale where fcfs meets
                  about half the SLOs (found with at most --calibration-runs fcfs runs, or given
                  with --azure-time-scale / --burstgpt-time-scale); SLO classes
                  interactive:1:1000/100,batch:1:20000 (priority 0 / 1); fcfs, priority, slo.
  3. swap         fcfs on a small pool (--swap-num-kv-blocks 48), 24 random requests of 64 + 64
                  tokens at once (they outgrow the pool while decoding: forced preemption),
                  --preemption-mode recompute / swap / auto: preemptions by mode (from /metrics),
                  output throughput, e2e, and each request's longest inter-token gap (a resumed
                  request's stall shows there).

Writes one JSON (--result-file: every run's bench summary, the plan, the tables) and prints the
tables.  Per-run bench JSON and server logs go to --work-dir.

    python benchmarks/scheduling_serve.py --result-file sched_serve.json            # ~13 min
    python benchmarks/scheduling_serve.py --tiny --result-file /tmp/smoke.json      # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvserve.bench.paths import default_file  # noqa: E402
from kvserve.bench.traces import READERS  # noqa: E402
from kvserve.launch.process import CliProcess, wait_healthy  # noqa: E402

SLO_CLASSES = "interactive:1:1000/100,batch:1:20000"
TENANTS = "heavy:4,light:1"


class Bench:
    """Servers and `kvserve bench serve` runs; every summary is kept in `runs` by name."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.runs: dict[str, dict[str, Any]] = {}
        self.t0 = time.monotonic()

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    @contextmanager
    def server(self, name: str, *extra: str) -> Iterator[CliProcess]:
        a = self.args
        argv = ["serve", *([a.model] if a.model else []), "--no-access-log", "--max-num-seqs", str(a.max_num_seqs),
                "--no-enable-prefix-caching", *extra]
        proc = CliProcess(argv, self.work / f"server-{name}.log")
        self.log(f"server {name}: kvserve {' '.join(argv)}")
        try:
            wait_healthy([proc], a.server_timeout_s)
            warm_up(proc.url)
            yield proc
        finally:
            proc.stop(60.0)

    def bench(self, proc: CliProcess, name: str, *bench_args: str) -> dict[str, Any]:
        """One `kvserve bench serve` run; returns its summary (also kept in self.runs)."""
        a = self.args
        out = self.work / f"{name}.json"
        scale = [] if "random" in bench_args else ["--length-scale", str(a.length_scale)]  # traces only
        cmd = [sys.executable, "-m", "kvserve.entrypoints.cli", "bench", "serve", "--base-url", proc.url,
               "--tokenizer", a.tokenizer, *scale, "--seed", str(a.seed),
               "--no-plots", "--no-progress", "--result-file", str(out), *bench_args]
        self.log(f"{name}: kvserve bench serve {' '.join(cmd[5:])}")
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        command = " ".join(["kvserve bench serve", *cmd[5:]])
        if done.returncode != 0 or not out.exists():
            # Recorded and skipped (its table rows are left out): one failed run does not
            # lose the others.
            self.log(f"{name}: kvserve bench serve failed ({done.returncode}):\n{done.stderr[-3000:]}")
            self.runs[name] = dict(command=command, error=done.stderr[-3000:])
            self.save()
            return {}
        summary = json.loads(out.read_text())["runs"][0]["summary"]
        self.runs[name] = dict(command=command, summary=summary, file=str(out))
        self.save()
        return summary

    def save(self, **extra: Any) -> None:
        """The result file so far (rewritten after every run, so a crash keeps what ran)."""
        doc = dict(args=vars(self.args), wall_s=time.monotonic() - self.t0, **extra, runs=self.runs)
        Path(self.args.result_file).write_text(json.dumps(doc, indent=1, default=str) + "\n")


def warm_up(url: str) -> None:
    """One short request, so the first measured one does not pay for lazy initialisation."""
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    r = httpx.post(url + "/v1/completions", json=dict(model=model, prompt=list(range(100, 132)), max_tokens=4),
                   timeout=300)
    r.raise_for_status()


def metric_total(url: str, prefix: str) -> dict[str, float]:
    """Samples of /metrics whose name starts with `prefix`, by their label set."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name.startswith(prefix) and s.name.endswith("_total"):
                out[",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")] = s.value
    return out


# ------------------------------------------------------------------------------- plan
def trace_shape(dataset: str, n: int, length_scale: float) -> tuple[float, float, int]:
    """(mean gap between the first `n` usable rows' timestamps in trace seconds, mean tokens
    (prompt + output) per request after --length-scale, rows used)."""
    rows = [r for r in READERS[dataset](default_file(dataset)) if r.input_len > 0 and r.output_len > 0][:n]
    ts = [r.timestamp_s or 0.0 for r in rows]
    gap = (ts[-1] - ts[0]) / max(1, len(rows) - 1)
    tokens = statistics.fmean(max(1, round(r.input_len * length_scale)) + max(1, round(r.output_len * length_scale))
                              for r in rows)
    return gap, tokens, len(rows)


def longest_blocks(args: argparse.Namespace, block_size: int = 16) -> int:
    """KV blocks of one swap-run request at its end (the small pool must hold it)."""
    return -(-(args.swap_input_len + args.swap_output_len) // block_size)


def plan(args: argparse.Namespace, capacity: float) -> dict[str, Any]:
    """Every run's size from the capacity C (req/s on the capacity run's Azure lengths)."""
    low_r, high_r = args.low_load * capacity, args.high_load * capacity
    _, cap_tok, _ = trace_shape("azure-conv", args.capacity_prompts, args.length_scale)
    n_az = max(8, round(args.goodput_load * capacity * args.goodput_window_s))
    az_gap, az_tok, _ = trace_shape("azure-conv", n_az, args.length_scale)
    bg_gap, bg_tok, n_bg = trace_shape("burstgpt", args.burstgpt_prompts, args.length_scale)
    # First time scales: each trace's rows arrive at goodput_load x C, C converted by tokens per
    # request; calibrate() then moves them toward fcfs meeting half the SLOs.
    scale = {"azure": args.azure_time_scale or cap_tok / (args.goodput_load * capacity * az_tok * az_gap),
             "burstgpt": args.burstgpt_time_scale or cap_tok / (args.goodput_load * capacity * bg_tok * bg_gap)}
    p: dict[str, Any] = dict(
        capacity_rps=capacity,
        low=dict(rate=low_r, n=max(10, round(low_r * args.window_s))),
        high=dict(rate=high_r, n=max(10, round(high_r * args.high_window_s))),
        goodput={t: dict(n=n, time_scale=scale[t], tokens_per_request=tok)
                 for t, n, tok in (("azure", n_az, az_tok), ("burstgpt", n_bg, bg_tok))},
        swap=dict(n=args.swap_prompts, num_kv_blocks=max(args.swap_num_kv_blocks, 2 + longest_blocks(args))))
    # Estimate: a run lasts about max(its arrival window, its requests / C), plus a bench start.
    runs = 4 * max(args.window_s, p["low"]["n"] / capacity) + 3 * max(args.high_window_s, p["high"]["n"] / capacity)
    runs += (2 + args.calibration_runs) * 1.2 * (n_az * az_tok + n_bg * bg_tok) / (cap_tok * capacity)
    runs += 3 * 1.5 * args.swap_prompts * (args.swap_input_len + 2 * args.swap_output_len) / (cap_tok * capacity)
    p["estimated_s"] = 8 * args.est_server_start_s + (12 + 2 * args.calibration_runs) * args.est_bench_start_s + runs
    return p


# ---------------------------------------------------------------------------- experiments
def fairness_args(p: dict[str, Any], level: str, *extra: str) -> list[str]:
    q = p[level]
    return ["--dataset", "azure-conv", "--num-prompts", str(q["n"]), "--request-rate", f"{q['rate']:.4g}",
            "--tenants", TENANTS, *extra]


def goodput_args(p: dict[str, Any], trace: str, scale: float) -> list[str]:
    g = p["goodput"][trace]
    return ["--dataset", "azure-conv" if trace == "azure" else "burstgpt", "--num-prompts", str(g["n"]),
            "--replay-timestamps", "--time-scale", f"{scale:.6g}", "--slo-classes", SLO_CLASSES]


def calibrate(b: Bench, proc: CliProcess, p: dict[str, Any], trace: str) -> float:
    """fcfs runs, moving the time scale until fcfs meets 35-65% of the SLOs: halved (more load)
    or doubled until both sides are bracketed, then bisected (log scale); at most
    --calibration-runs, the run closest to half is kept as fcfs's goodput run."""
    a = b.args
    scale = p["goodput"][trace]["time_scale"]
    given = a.azure_time_scale if trace == "azure" else a.burstgpt_time_scale
    best: Optional[tuple[float, float, str]] = None
    light: Optional[float] = None  # a scale where fcfs met too many (too little load)
    heavy: Optional[float] = None  # one where it met too few
    for i in range(1 if given else max(1, a.calibration_runs)):
        name = f"goodput-{trace}-fcfs-{i}"
        summary = b.bench(proc, name, *goodput_args(p, trace, scale))
        met = (summary.get("slo_classes") or {}).get("slo_met_fraction") or 0.0
        b.log(f"  {trace} time scale {scale:.4g}: fcfs meets {met:.0%}")
        if best is None or abs(met - 0.5) < abs(best[1] - 0.5):
            best = (scale, met, name)
        if 0.35 <= met <= 0.65:
            break
        if met > 0.65:
            light = scale if light is None else min(light, scale)
        else:
            heavy = scale if heavy is None else max(heavy, scale)
        scale = math.sqrt(light * heavy) if light and heavy else scale * (0.5 if met > 0.65 else 2.0)
    assert best is not None
    b.runs[f"goodput-{trace}-fcfs"] = b.runs[best[2]]
    p["goodput"][trace]["time_scale"] = best[0]
    return best[0]


def swap_run(b: Bench, mode: str, p: dict[str, Any]) -> None:
    a = b.args
    with b.server(f"swap-{mode}", "--num-kv-blocks", str(p["swap"]["num_kv_blocks"]), "--preemption-mode", mode,
                  "--swap-space", str(a.swap_space)) as proc:
        before = metric_total(proc.url, "kvserve:preemptions")
        b.bench(proc, f"swap-{mode}", "--dataset", "random", "--input-len", str(a.swap_input_len),
                "--output-len", str(a.swap_output_len), "--num-prompts", str(p["swap"]["n"]), "--request-rate", "inf")
        after = metric_total(proc.url, "kvserve:preemptions")
        b.runs[f"swap-{mode}"]["preemptions"] = {k: v - before.get(k, 0.0) for k, v in after.items()
                                                 if v - before.get(k, 0.0)}
        if "file" not in b.runs[f"swap-{mode}"]:
            return  # the run failed (recorded)
        records = json.loads(Path(b.runs[f"swap-{mode}"]["file"]).read_text())["runs"][0]["requests"]
        b.runs[f"swap-{mode}"]["max_gap_ms"] = [max(r["itl_ms"]) for r in records if r["itl_ms"]]


def run_all(b: Bench) -> dict[str, Any]:
    a = b.args
    exps = set(a.experiments)
    if a.capacity and exps == {"swap"}:  # nothing to run on the fcfs server
        p = plan(a, a.capacity)
        for mode in ("recompute", "swap", "auto"):
            swap_run(b, mode, p)
        return p
    with b.server("fcfs", "--scheduling-policy", "fcfs") as proc:
        cap = a.capacity or b.bench(proc, "capacity", "--dataset", "azure-conv", "--num-prompts",
                                    str(a.capacity_prompts), "--request-rate", "inf").get("request_throughput")
        if not cap:
            raise SystemExit(f"the capacity run failed (log: {b.work}); every size derives from it")
        p = plan(a, cap)
        b.log(f"capacity {cap:.3f} req/s; plan {json.dumps(p)}; estimated {p['estimated_s'] / 60:.1f} min in all")
        if "fairness" in exps:
            b.bench(proc, "fair-low-fcfs", *fairness_args(p, "low"))
            b.bench(proc, "fair-low-alone", *fairness_args(p, "low", "--only-tenant", "light"))
            b.bench(proc, "fair-high-fcfs", *fairness_args(p, "high"))
        if "goodput" in exps:
            for trace in ("azure", "burstgpt"):
                calibrate(b, proc, p, trace)
    if "fairness" in exps:
        with b.server("fair", "--scheduling-policy", "fair") as proc:
            b.bench(proc, "fair-low-fair", *fairness_args(p, "low"))
            b.bench(proc, "fair-high-fair", *fairness_args(p, "high"))
        with b.server("fair-w2", "--scheduling-policy", "fair", "--tenant-weights", "heavy=2") as proc:
            b.bench(proc, "fair-low-fair-w2", *fairness_args(p, "low", "--tenant-weights", "heavy=2"))
            b.bench(proc, "fair-high-fair-w2", *fairness_args(p, "high", "--tenant-weights", "heavy=2"))
    if "goodput" in exps:
        for policy in ("priority", "slo"):
            with b.server(policy, "--scheduling-policy", policy) as proc:
                for trace in ("azure", "burstgpt"):
                    b.bench(proc, f"goodput-{trace}-{policy}",
                            *goodput_args(p, trace, p["goodput"][trace]["time_scale"]))
    if "swap" in exps:
        for mode in ("recompute", "swap", "auto"):
            swap_run(b, mode, p)
    return p


# --------------------------------------------------------------------------------- tables
def ok(b: Bench, name: str) -> Optional[dict[str, Any]]:
    """The run `name` if it ran and did not fail."""
    run = b.runs.get(name)
    return run if run is not None and "summary" in run else None


def _ms(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v * 1e3:.0f} ms"


def fairness_table(b: Bench, level: str) -> list[str]:
    alone = ok(b, f"fair-{level}-alone")
    alone_light = alone["summary"]["tenants"]["tenants"]["light"] if alone else {}
    alone_p50 = alone_light.get("ttft_p50_s")
    lines = ["| policy | weights | served tok/s | heavy:light served | max-min target | served / target "
             "| light TTFT p50 | p50 vs alone | light TTFT p99 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, policy, weights in (("fcfs", "fcfs", "equal"), ("fair", "fair", "equal"), ("fair-w2", "fair", "heavy=2")):
        run = ok(b, f"fair-{level}-{name}")
        if run is None:
            continue
        t = run["summary"]["tenants"]
        f, light = t.get("fairness") or {}, t["tenants"].get("light", {})
        p50 = light.get("ttft_p50_s")
        vs = f"{p50 / alone_p50:.2f}x" if p50 is not None and alone_p50 else "n/a"
        num = lambda k: "n/a" if f.get(k) is None else f"{f[k]:.2f}"  # noqa: E731
        lines.append(f"| {policy} | {weights} | {f.get('served_tokens_per_s') or 0:.0f} | {num('served_ratio')} | "
                     f"{num('target_ratio')} | {num('ratio_vs_target')} | {_ms(p50)} | {vs} | "
                     f"{_ms(light.get('ttft_p99_s'))} |")
    if alone_p50:
        lines.append(f"\nlight alone: TTFT p50 {_ms(alone_p50)}, p99 {_ms(alone_light.get('ttft_p99_s'))}")
    return lines


def goodput_table(b: Bench, trace: str) -> list[str]:
    lines = ["| policy | SLO met | interactive met | batch met | goodput (req/s) | vs fcfs | TTFT p50 | TTFT p99 |",
             "|---|---|---|---|---|---|---|---|"]
    base = ok(b, f"goodput-{trace}-fcfs")
    base_g = base and base["summary"]["slo_classes"]["goodput_rps"]
    for policy in ("fcfs", "priority", "slo"):
        run = ok(b, f"goodput-{trace}-{policy}")
        if run is None:
            continue
        s = run["summary"]
        c = s["slo_classes"]
        met = {k: v["met_fraction"] for k, v in c["classes"].items()}
        ttft = s["ttft"] or {}
        vs = f"{c['goodput_rps'] / base_g:.2f}x" if base_g else "n/a"
        lines.append(f"| {policy} | {c['slo_met_fraction']:.0%} | {met.get('interactive', 0):.0%} | "
                     f"{met.get('batch', 0):.0%} | {c['goodput_rps']:.3f} | {vs} | {ttft.get('p50', 0):.0f} ms | "
                     f"{ttft.get('p99', 0):.0f} ms |")
    return lines


def swap_table(b: Bench) -> list[str]:
    lines = ["| mode | preemptions (from /metrics) | completed | output tok/s | e2e mean / p99 "
             "| longest gap per request p50 / p90 / max |", "|---|---|---|---|---|---|"]
    for mode in ("recompute", "swap", "auto"):
        run = ok(b, f"swap-{mode}")
        if run is None or "max_gap_ms" not in run:
            continue
        s, gaps = run["summary"], sorted(run["max_gap_ms"])
        pre = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(run["preemptions"].items())) or "none"
        q = (lambda f: f"{gaps[min(len(gaps) - 1, int(f * len(gaps)))]:.0f}") if gaps else (lambda f: "n/a")
        e2e = s["e2el"] or {}
        lines.append(f"| {mode} | {pre} | {s['completed']}/{s['num_requests']} | {s['output_throughput']:.1f} | "
                     f"{e2e.get('mean', 0) / 1e3:.2f} / {e2e.get('p99', 0) / 1e3:.2f} s | "
                     f"{q(0.5)} / {q(0.9)} / {gaps[-1] if gaps else 0:.0f} ms |")
    return lines


def tables(b: Bench, p: dict[str, Any]) -> str:
    a = b.args
    out = [f"## kvserve serve {a.model or '(built-in SmolLM2-135M-Instruct)'}, --max-num-seqs {a.max_num_seqs}, "
           f"length scale {a.length_scale:g}; capacity C = {p['capacity_rps']:.3f} req/s", ""]
    for level, load in (("low", a.low_load), ("high", a.high_load)):
        if f"fair-{level}-fcfs" in b.runs or f"fair-{level}-fair" in b.runs:
            q = p[level]
            out += [f"### fairness: heavy:4,light:1 at {load:g} x C = {q['rate']:.3g} req/s, {q['n']} requests", ""]
            out += fairness_table(b, level) + [""]
    for trace in ("azure", "burstgpt"):
        if f"goodput-{trace}-fcfs" in b.runs:
            g = p["goodput"][trace]
            out += [f"### goodput: {trace}, {g['n']} requests, time scale {g['time_scale']:.4g}, {SLO_CLASSES}", ""]
            out += goodput_table(b, trace) + [""]
    if any(k.startswith("swap-") for k in b.runs):
        out += [f"### preemption: fcfs, {p['swap']['num_kv_blocks']} KV blocks of 16 tokens, {a.swap_prompts} "
                f"requests of {a.swap_input_len} + {a.swap_output_len} tokens at once", ""]
        out += swap_table(b) + [""]
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model for kvserve serve (default: its built-in SmolLM2-135M)")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct", help="for bench serve's token ids")
    ap.add_argument("--experiments", nargs="+", choices=("fairness", "goodput", "swap"),
                    default=["fairness", "goodput", "swap"])
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--length-scale", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--capacity", type=float, default=None, help="C in req/s (skip the capacity run)")
    ap.add_argument("--capacity-prompts", type=int, default=40)
    ap.add_argument("--low-load", type=float, default=1.25, help="fairness: R = this x C (light below its share)")
    ap.add_argument("--high-load", type=float, default=3.0, help="fairness: R = this x C (both backlogged)")
    ap.add_argument("--window-s", type=float, default=40.0, help="fairness arrival window at the low load")
    ap.add_argument("--high-window-s", type=float, default=12.0, help="fairness arrival window at the high load")
    ap.add_argument("--goodput-load", type=float, default=1.5, help="goodput: first guess of the load, x C")
    ap.add_argument("--goodput-window-s", type=float, default=20.0, help="goodput: Azure requests = load x C x this")
    ap.add_argument("--burstgpt-prompts", type=int, default=54)
    ap.add_argument("--calibration-runs", type=int, default=2, help="goodput: at most this many fcfs runs per trace")
    ap.add_argument("--azure-time-scale", type=float, default=None, help="skip the Azure calibration")
    ap.add_argument("--burstgpt-time-scale", type=float, default=None, help="skip the BurstGPT calibration")
    ap.add_argument("--swap-prompts", type=int, default=24)
    ap.add_argument("--swap-input-len", type=int, default=64, help="swap: prompt tokens per request (random)")
    ap.add_argument("--swap-output-len", type=int, default=64,
                    help="swap: output tokens per request: requests grow past the pool while decoding")
    ap.add_argument("--swap-num-kv-blocks", type=int, default=48, help="small pool: forced preemption")
    ap.add_argument("--swap-space", type=float, default=0.25, help="GiB of host swap space")
    ap.add_argument("--server-timeout-s", type=float, default=600.0)
    ap.add_argument("--est-server-start-s", type=float, default=15.0, help="for the printed estimate")
    ap.add_argument("--est-bench-start-s", type=float, default=3.0, help="for the printed estimate")
    ap.add_argument("--tiny", action="store_true", help="smoke test: a few requests per run (not a measurement)")
    ap.add_argument("--work-dir", default=None, help="per-run bench JSON and server logs (default: a temp dir)")
    ap.add_argument("--result-file", default="scheduling_serve.json")
    args = ap.parse_args()
    if args.tiny:
        args.length_scale = 0.02
        args.capacity_prompts, args.window_s, args.high_window_s, args.goodput_window_s = 4, 3.0, 2.0, 3.0
        args.burstgpt_prompts, args.swap_prompts, args.swap_num_kv_blocks, args.calibration_runs = 6, 8, 6, 1
        args.swap_input_len, args.swap_output_len = 16, 24
    return args


def main() -> int:
    args = parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sched-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    b = Bench(args, work)
    p = run_all(b)
    text = tables(b, p)
    print(text)
    b.save(plan=p, tables=text)
    failed = sorted(k for k, v in b.runs.items() if "error" in v)
    b.log(f"wrote {args.result_file} ({(time.monotonic() - b.t0) / 60:.1f} min; per-run files in {work})"
          + (f"; FAILED runs: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
