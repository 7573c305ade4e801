#!/usr/bin/env python
"""Server overhead: output throughput through HTTP streaming vs the offline engine, same workload.

Workload: N concurrent requests, each a random token-id prompt of --prompt-len tokens and exactly
--output-len greedy output tokens (ignore_eos).  Offline: `LLM.generate` in this process.  Server:
`kvserve serve` in a subprocess (its engine in a child process), N concurrent streaming
/v1/completions requests from an httpx client in this process; throughput counts the server's
usage tokens over the wall time from the first send to the last `[DONE]`.  The client runs on the
same cores as the server, so its parsing cost is part of the measured overhead.

CPU accounting (robust to load from other processes, unlike wall time): CPU seconds per output
token of the offline process, and of the server's engine process, API process and the client.

Offline and server runs are interleaved (offline, server, offline, server, ...) so that load from
other processes on a shared machine hits both alike; medians are reported.  Also: TTFT of a short
prompt on the idle server (median of --ttft-runs), next to the offline engine's time to first token
for the same prompt.

    python benchmarks/server_overhead.py                       # SmolLM2-135M-shaped random model
    python benchmarks/server_overhead.py --runs 5 --output-len 128

The model is a random-weight Llama with SmolLM2-135M's shape (30 layers, hidden 576, 9 heads /
3 KV heads, MLP 1536) and the gpt2 tokenizer, built once under --cache-dir.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOLLM2_135M_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
)


def build_model(out_dir: Path, tokenizer_dir: Path) -> Path:
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         **SMOLLM2_135M_SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    return out_dir


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab - 1000) for _ in range(length)] for _ in range(n)]


# ---------------------------------------------------------------------------------- offline
def offline_run(llm: Any, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    from kvserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    return wall, sum(len(o.outputs[0].token_ids) for o in outs)


def offline_ttft(llm: Any, prompt: list[int]) -> float:
    from kvserve.sampling_params import SamplingParams

    engine = llm.engine
    t0 = time.perf_counter()
    rid = engine.add_request({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=8))
    while True:
        for out in engine.step():
            if out.request_id == rid and out.outputs and out.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
                engine.abort(rid)
                return ttft


# ----------------------------------------------------------------------------------- server
def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_pid(server_pid: int) -> int:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    assert children, "the server has no engine process"
    return int(children[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    import httpx

    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kvserve.entrypoints.cli", "serve", str(model_dir), "--port",
                             str(port), "--served-model-name", "bench", "--no-access-log", "--log-level", "warning"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise TimeoutError("server did not start")


async def _stream(client: Any, url: str, prompt: list[int], output_len: int) -> tuple[int, float | None]:
    """One streaming request: (output tokens from usage, seconds to the first token event)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if ttft is None and chunk["choices"]:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, ttft


async def server_run(base_url: str, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        url = base_url + "/v1/completions"
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_stream(client, url, p, output_len) for p in prompts))
        wall = time.perf_counter() - t0
    return wall, sum(tokens for tokens, _ in results)


async def server_ttft(base_url: str, prompt: list[int]) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        _, ttft = await _stream(client, base_url + "/v1/completions", prompt, 8)
    assert ttft is not None
    return ttft


# ------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None, help="model to use (default: build the random one)")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/kvserve-bench"), help="where the model is built")
    ap.add_argument("--tokenizer-dir", type=Path, default=Path(os.environ.get(
        "KVSERVE_SHARED_DATA", "/work/shared/data")) / "tokenizers" / "gpt2")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="measured runs of each (after one warm-up)")
    ap.add_argument("--ttft-runs", type=int, default=10)
    ap.add_argument("--ttft-prompt-len", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--offline-omp-wait-policy", choices=["default", "passive"], default="default",
                    help="OpenMP wait policy of the offline engine (the server's engine process uses passive "
                         "unless OMP_WAIT_POLICY is set); 'passive' compares like with like")
    args = ap.parse_args()
    if args.offline_omp_wait_policy == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch is imported (then also the server's)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_dir = args.model_dir or build_model(args.cache_dir / "smollm2-135m-random", args.tokenizer_dir)
    from kvserve.engine.llm import LLM

    llm = LLM(str(model_dir))
    vocab = llm.engine.core.arch.vocab_size
    prompts = make_prompts(args.num_requests, args.prompt_len, vocab)
    # Each run uses fresh prompts so the prefix cache cannot serve one run from the previous one.
    run_prompts = [make_prompts(args.num_requests, args.prompt_len, vocab, seed=1 + i) for i in range(args.runs)]
    short = make_prompts(args.ttft_runs + 1, args.ttft_prompt_len, vocab, seed=999)

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = args.cache_dir / "server_overhead.server.log"
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    server = start_server(model_dir, port, log_path)
    try:
        print(f"model {model_dir} | {args.num_requests} requests x ({args.prompt_len} prompt + "
              f"{args.output_len} output) tokens | {os.cpu_count()} CPUs", flush=True)
        offline_run(llm, prompts, args.output_len)  # warm-up
        asyncio.run(server_run(base_url, prompts, args.output_len))
        offline_tps, server_tps = [], []
        cpu: dict[str, list[float]] = {"offline": [], "engine": [], "api": [], "client": []}
        engine = engine_pid(server.pid)
        for i, rp in enumerate(run_prompts):
            c0 = time.process_time()
            wall, tokens = offline_run(llm, rp, args.output_len)
            cpu["offline"].append((time.process_time() - c0) / tokens)
            offline_tps.append(tokens / wall)
            before = (process_cpu_s(engine), process_cpu_s(server.pid), time.process_time())
            s_wall, s_tokens = asyncio.run(server_run(base_url, rp, args.output_len))
            after = (process_cpu_s(engine), process_cpu_s(server.pid), time.process_time())
            for key, b, a in zip(("engine", "api", "client"), before, after):
                cpu[key].append((a - b) / s_tokens)
            assert s_tokens == tokens == args.num_requests * args.output_len, (s_tokens, tokens)
            server_tps.append(s_tokens / s_wall)
            print(f"run {i + 1}: offline {offline_tps[-1]:8.1f} tok/s ({wall:.2f}s)   "
                  f"server {server_tps[-1]:8.1f} tok/s ({s_wall:.2f}s)   ratio {server_tps[-1] / offline_tps[-1]:.3f}   "
                  f"CPU ms/token: offline {1e3 * cpu['offline'][-1]:.2f}, server engine {1e3 * cpu['engine'][-1]:.2f}"
                  f" + API {1e3 * cpu['api'][-1]:.3f} + client {1e3 * cpu['client'][-1]:.3f}", flush=True)
        off_ttft = [offline_ttft(llm, p) for p in short[1:]]
        srv_ttft = []
        asyncio.run(server_ttft(base_url, short[0]))  # warm-up
        for p in short[1:]:
            srv_ttft.append(asyncio.run(server_ttft(base_url, p)))
            time.sleep(0.05)  # idle server between requests
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    result = {
        "offline_tok_s_median": statistics.median(offline_tps),
        "server_tok_s_median": statistics.median(server_tps),
        "ratio_of_medians": statistics.median(server_tps) / statistics.median(offline_tps),
        "offline_tok_s": offline_tps, "server_tok_s": server_tps,
        "cpu_ms_per_token_median": {k: 1e3 * statistics.median(v) for k, v in cpu.items()},
        "server_ttft_ms_median": 1000 * statistics.median(srv_ttft),
        "offline_ttft_ms_median": 1000 * statistics.median(off_ttft),
        "config": vars(args) | {"model_dir": str(model_dir)},
    }
    print(f"\noffline engine : {result['offline_tok_s_median']:8.1f} output tok/s (median of {args.runs})")
    print(f"HTTP streaming : {result['server_tok_s_median']:8.1f} output tok/s (median of {args.runs})")
    print(f"ratio          : {result['ratio_of_medians']:.3f}  (server / offline)")
    c = result["cpu_ms_per_token_median"]
    server_cpu = c["engine"] + c["api"] + c["client"]
    print(f"CPU per output token: offline {c['offline']:.2f} ms; server {server_cpu:.2f} ms = engine {c['engine']:.2f} "
          f"+ API process {c['api']:.3f} + client {c['client']:.3f}  (CPU-bound ratio {c['offline'] / server_cpu:.3f})")
    print(f"TTFT, idle server, {args.ttft_prompt_len}-token prompt: {result['server_ttft_ms_median']:.1f} ms median "
          f"(offline engine: {result['offline_ttft_ms_median']:.1f} ms)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
