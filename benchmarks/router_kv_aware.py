#!/usr/bin/env python
"""KV-aware routing against round-robin: prefix-cache hit rate and TTFT on the Mooncake conversation trace.

Setup: `kvserve serve` instances of the tiny test model (tests/helpers/tiny_models.py, llama-tied
with the gpt2 tokenizer, context raised to 4,096), two per router: one `--policy round-robin`
router, and one `--policy kv-aware` router per --kv-weights value (its --kv-overlap-weight), all
started before measuring.  The same requests then go through each router in turn (round-robin
first), so every policy starts from cold caches and sees identical prompts in identical order.

Workload: the first --num-requests records of the trace, sent at the trace's own arrival times
replayed --speedup times faster (600 records span 210 s of the trace; 70 s at the default 3x).  A
record's prompt is synthesized from its `hash_ids` (kvserve.bench.tokens.prefix_block_prompt): hash
id h becomes a fixed block of --block-tokens random token ids, so records sharing leading hash ids
share exactly those leading blocks; the prompt length is the record's input_length scaled by
--block-tokens / 512 (Mooncake's block is 512 tokens).  With --block-tokens equal to the engine's
block size (16), one trace block is one KV block.  Prompts go as token ids; each request streams
--output-tokens tokens (ignore_eos).

Hit rate = the instances' own counters, summed over the pair: increase of
vllm:prefix_cache_hits_total / increase of vllm:prefix_cache_queries_total (prompt tokens).  TTFT is
the client's time from sending to the first streamed token.  Also shown: the kv-aware router's
predicted hit rate (kvserve:router_kv_predicted_hit_rate), how requests split over the instances,
and the most requests in flight at once ("peak").

    python benchmarks/router_kv_aware.py                      # 600 requests at 3x the trace's rate
    python benchmarks/router_kv_aware.py --num-requests 1000 --speedup 5 --json router.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("KVSERVE_SHARED_DATA", REPO.parent / "shared" / "data"))
TRACE = SHARED / "traces" / "mooncake" / "conversation_trace.jsonl"
MOONCAKE_BLOCK = 512

from kvserve.launch.process import CliProcess, wait_healthy  # noqa: E402


def build_model(out: Path) -> Path:
    if (out / "model.safetensors").is_file():
        return out
    from tests.helpers.tiny_models import build_tiny_model

    return build_tiny_model("llama-tied", out, tokenizer="gpt2", overrides={"max_position_embeddings": 4096})


def make_prompts(trace: Path, num: int, block_tokens: int, max_prompt: int, vocab: int,
                 seed: int) -> tuple[list[list[int]], list[float]]:
    """(prompt token ids, arrival time in seconds) of the first `num` records."""
    import numpy as np

    from kvserve.bench.tokens import IdsRenderer, prefix_block_prompt
    from kvserve.bench.traces import read_mooncake

    pool = IdsRenderer(vocab, low=1000).pool  # ordinary ids (away from gpt2's special/byte tokens)
    prompts, stamps = [], []
    for rec in read_mooncake(trace)[:num]:
        stamps.append(rec.timestamp_s or 0.0)
        length = min(max_prompt, max(1, math.ceil(rec.input_len * block_tokens / MOONCAKE_BLOCK)))
        fill = np.random.default_rng([seed, 1 << 20, rec.line])
        prompts.append(prefix_block_prompt(pool, rec.hash_ids, length, block_tokens, seed, fill))
    return prompts, stamps


async def replay(url: str, prompts: list[list[int]], send_at: list[float], output_tokens: int) -> tuple[list[float], int]:
    """Send prompt i at `send_at[i]` seconds from the start; return each request's TTFT and the most
    requests that were in flight at once."""
    import httpx

    ttfts: list[float] = [0.0] * len(prompts)
    inflight = peak = 0

    async def one(client: httpx.AsyncClient, i: int, start: float) -> None:
        nonlocal inflight, peak
        await asyncio.sleep(max(0.0, start + send_at[i] - time.perf_counter()))
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": output_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True}
        inflight += 1
        peak = max(peak, inflight)
        t0 = time.perf_counter()
        try:
            async with client.stream("POST", url + "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"request {i}: {resp.status_code} {(await resp.aread())[:300]!r}")
                async for line in resp.aiter_lines():
                    if line.startswith("data: {") and '"text"' in line and not ttfts[i]:
                        ttfts[i] = time.perf_counter() - t0
        finally:
            inflight -= 1

    # Idle connections expire before the router's keep-alive timeout: no reuse of a closing one.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=1.0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i, start) for i in range(len(prompts))))
    return ttfts, peak


def scrape(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            key = s.name + ("{" + s.labels["instance"] + "}" if "instance" in s.labels else "")
            out[key] = out.get(key, 0.0) + s.value
    return out


def run_policy(name: str, router: CliProcess, pair: list[CliProcess], prompts: list[list[int]], send_at: list[float],
               args: argparse.Namespace) -> dict[str, Any]:
    before = [scrape(p.url) for p in pair]
    t0 = time.perf_counter()
    ttfts, peak = asyncio.run(replay(router.url, prompts, send_at, args.output_tokens))
    wall = time.perf_counter() - t0
    after = [scrape(p.url) for p in pair]

    def grew(key: str) -> float:
        return sum(a.get(key, 0.0) - b.get(key, 0.0) for a, b in zip(after, before))

    hits, queries = grew("vllm:prefix_cache_hits_total"), grew("vllm:prefix_cache_queries_total")
    rmetrics = scrape(router.url)
    split = [int(rmetrics.get(f"kvserve:router_requests_total{{{p.url}}}", 0)) for p in pair]
    return {"policy": name, "requests": len(prompts), "prefix_hit_tokens": hits, "prompt_tokens": queries,
            "hit_rate": hits / queries if queries else 0.0, "ttft_mean_s": statistics.mean(ttfts),
            "ttft_p50_s": statistics.median(ttfts), "wall_s": wall, "peak_inflight": peak,
            "requests_per_instance": split,
            "router_predicted_hit_rate": rmetrics.get("kvserve:router_kv_predicted_hit_rate")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--num-requests", type=int, default=600)
    ap.add_argument("--speedup", type=float, default=3.0, help="replay the trace's arrival times this many times "
                    "faster (default: %(default)s)")
    ap.add_argument("--block-tokens", type=int, default=16, help="tokens per trace hash id (default: %(default)s)")
    ap.add_argument("--output-tokens", type=int, default=2)
    ap.add_argument("--max-prompt-tokens", type=int, default=4000)
    ap.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache size of each instance (default: the "
                    "server's own sizing)")
    ap.add_argument("--kv-weights", type=float, nargs="+", default=[1.0, 4.0], metavar="W",
                    help="run kv-aware once per --kv-overlap-weight W, each on its own pair (default: 1 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/kvserve-router-bench"))
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.cache_dir / "model")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts, stamps = make_prompts(args.trace, args.num_requests, args.block_tokens, args.max_prompt_tokens, vocab,
                                   args.seed)
    send_at = [t / args.speedup for t in stamps]
    print(f"{len(prompts)} requests, {sum(map(len, prompts))} prompt tokens "
          f"(mean {statistics.mean(map(len, prompts)):.0f}, max {max(map(len, prompts))}) over {send_at[-1]:.0f} s "
          f"per policy", flush=True)
    serve = ["serve", str(model), "--served-model-name", "tiny", "--no-access-log", "--block-size", str(args.block_tokens)]
    if args.num_kv_blocks:
        serve += ["--num-kv-blocks", str(args.num_kv_blocks)]
    logs = args.cache_dir / "logs"
    logs.mkdir(exist_ok=True)
    # (label, router flags): round-robin, then kv-aware at each --kv-overlap-weight.
    configs = [("round-robin", ["--policy", "round-robin"])] + [
        (f"kv-aware w={w:g}", ["--policy", "kv-aware", "--kv-overlap-weight", str(w)]) for w in args.kv_weights]
    instances = [CliProcess(serve, logs / f"instance{i}.log") for i in range(2 * len(configs))]
    pairs = [instances[2 * k:2 * k + 2] for k in range(len(configs))]
    routers: list[CliProcess] = []
    try:
        wait_healthy(instances, 900)
        for (label, flags), pair in zip(configs, pairs):
            routers.append(CliProcess(["router", *flags, "--tokenizer", str(model), "--block-size", str(args.block_tokens),
                                 *[a for p in pair for a in ("--instance", p.url)]],
                                logs / f"router-{label.replace(' ', '-')}.log"))
        wait_healthy(routers, 120)
        results = [run_policy(label, r, pair, prompts, send_at, args)
                   for (label, _), r, pair in zip(configs, routers, pairs)]
    finally:
        for p in routers + instances:
            p.stop()
    print(f"\n{'policy':<16} {'hit rate':>9} {'hit tokens':>11} {'prompt tokens':>14} {'TTFT mean':>10} "
          f"{'TTFT p50':>9} {'wall':>7} {'peak':>5}  split")
    for r in results:
        print(f"{r['policy']:<16} {r['hit_rate']:>9.3f} {r['prefix_hit_tokens']:>11.0f} {r['prompt_tokens']:>14.0f} "
              f"{r['ttft_mean_s'] * 1000:>8.1f}ms {r['ttft_p50_s'] * 1000:>7.1f}ms {r['wall_s']:>6.1f}s {r['peak_inflight']:>5}  "
              f"{r['requests_per_instance']}")
    rr = results[0]
    for kv in results[1:]:
        ratio = kv["hit_rate"] / rr["hit_rate"] if rr["hit_rate"] else float("inf")
        kv["ratio_to_round_robin"] = ratio
        print(f"{kv['policy']} / round-robin hit rate: {ratio:.2f}x (target >= 1.5x); its router's predicted hit "
              f"rate {kv['router_predicted_hit_rate']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
