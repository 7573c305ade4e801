#!/usr/bin/env python
"""Multi-turn replay of the Mooncake conversation trace: device-only prefix caching vs KV tiers.

Workload (scaled down to run on a small CPU box):
  * conversations = requests grouped by their first two Mooncake hash ids (hash id 0 is a prefix
    every request shares); of the conversations with >= 2 turns (2,259 in the hour-long trace),
    every k-th by first appearance so that --conversations of them are kept (session sampling:
    arrivals stay spread over the hour), with all their turns, in trace order
    (--select first: the first --conversations instead, which all start at trace time ~0);
  * one 512-token Mooncake hash block becomes 512/--scale tokens (default 32), so equal hash-id
    prefixes are equal token prefixes (kvserve.bench.datasets.trace_requests); input lengths are
    divided by --scale and capped at --max-input, outputs divided by --scale and capped at --max-output;
  * timestamps divided by --time-scale and replayed in-process (requests are added between
    engine steps at their arrival time; TTFT = first token time - scheduled arrival).

The device pool holds --pool-frac (default 10%) of the working set (distinct KV blocks of all
prompts), or the largest request if that is more.  Systems, run side by side in one process,
interleaved --repeats times (a fresh engine and fresh tiers per run):
  device     prefix caching in the device pool only
  cpu        + a host-memory tier holding the whole working set
  cpu+disk   + a host tier of --cpu-frac of the working set over a disk tier holding all of it

    python benchmarks/kv_tiers_multiturn.py                       # defaults used in docs/kv_tiers.md
    python benchmarks/kv_tiers_multiturn.py --conversations 10 --repeats 1   # quicker
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from kv_tiers_common import (
    SMALL_SHAPE,
    ReplayRequest,
    build_llama,
    dump,
    median,
    percentile,
    replay,
    tier_summary,
)

TRACE = "/work/shared/data/traces/mooncake/conversation_trace.jsonl"


def conversation_workload(args: argparse.Namespace) -> list[ReplayRequest]:
    from kvserve.bench.datasets import trace_requests
    from kvserve.bench.tokens import IdsRenderer
    from kvserve.bench.traces import TraceRecord, read_mooncake

    convs: dict[tuple[int, ...], list[TraceRecord]] = defaultdict(list)
    for r in read_mooncake(args.trace):
        if len(r.hash_ids) >= 2:
            convs[tuple(r.hash_ids[:2])].append(r)
    multi = [g for g in convs.values() if len(g) >= 2]
    step = max(1, len(multi) // args.conversations) if args.select == "every" else 1
    chosen = multi[::step][: args.conversations]
    recs = sorted((r for g in chosen for r in g), key=lambda r: (r.timestamp_s, r.line))
    t_first = recs[0].timestamp_s or 0.0
    scaled = [TraceRecord(((r.timestamp_s or 0.0) - t_first) / args.time_scale,
                          min(math.ceil(r.input_len / args.scale), args.max_input),
                          min(max(1, math.ceil(r.output_len / args.scale)), args.max_output),
                          r.hash_ids, r.line) for r in recs]
    reqs, _ = trace_requests(scaled, None, IdsRenderer(SMALL_SHAPE["vocab_size"]), args.seed,
                             block_size=512 // args.scale, source=args.trace)
    return [ReplayRequest(r.timestamp_s or 0.0, list(r.prompt), r.output_len) for r in reqs]  # type: ignore[arg-type]


def working_set_blocks(reqs: list[ReplayRequest], block_size: int) -> int:
    from kvserve.core.hashing import hash_block_tokens

    seen: set[bytes] = set()
    for r in reqs:
        seen.update(hash_block_tokens(r.prompt_token_ids, block_size))
    return len(seen)


def ideal_hit_rate(reqs: list[ReplayRequest], block_size: int) -> float:
    """Prefix hit rate of an unbounded cache (every block seen before, never the last token)."""
    from kvserve.core.hashing import hash_block_tokens

    seen: set[bytes] = set()
    hit = 0
    for r in sorted(reqs, key=lambda r: r.arrival_s):
        hashes = hash_block_tokens(r.prompt_token_ids, block_size)
        usable = hashes[: (len(r.prompt_token_ids) - 1) // block_size]
        n = 0
        while n < len(usable) and usable[n] in seen:
            n += 1
        hit += n * block_size
        seen.update(hashes)
    return hit / sum(len(r.prompt_token_ids) for r in reqs)


def run_system(name: str, model: Path, reqs: list[ReplayRequest], args: argparse.Namespace, pool_blocks: int,
               ws_bytes: int, tmp: Path) -> dict:
    from kvserve.engine.llm_engine import LLMEngine

    kw: dict = {}
    if name == "cpu":
        kw = dict(kv_tiers=f"cpu:{2 * ws_bytes}", kv_offload_policy=args.policy)
    elif name == "cpu+disk":
        disk = Path(tempfile.mkdtemp(dir=tmp))
        kw = dict(kv_tiers=f"cpu:{int(args.cpu_frac * ws_bytes)},disk:{disk}:{2 * ws_bytes}",
                  kv_offload_policy=args.policy, kv_tier_write_policy=args.write_policy)
    engine = LLMEngine(str(model), block_size=args.block_size, num_kv_blocks=pool_blocks,
                       max_num_batched_tokens=args.max_batched_tokens, max_num_seqs=args.max_num_seqs, **kw)
    try:
        from kvserve import SamplingParams

        engine.add_request({"prompt_token_ids": [1, 2, 3, 4]}, SamplingParams(max_tokens=2), request_id="warmup")
        while engine.has_unfinished_requests():
            engine.step()
        results, wall = replay(engine, reqs)
        stats = engine.kv_tier_stats()
        preempt = engine.core.scheduler.num_preemptions
    finally:
        engine.close()
    ttft = [r.ttft_s for r in results]
    prompt = sum(r.prompt_len for r in results)
    cached = sum(r.cached_tokens for r in results)
    tier_tokens = stats["offload"]["blocks_used"] * args.block_size if stats else 0
    return {"system": name, "p50_ttft_s": percentile(ttft, 50), "p99_ttft_s": percentile(ttft, 99),
            "mean_ttft_s": sum(ttft) / len(ttft), "hit_rate": cached / prompt,
            "tier_hit_rate": tier_tokens / prompt, "wall_s": wall, "preemptions": preempt,
            "tiers": tier_summary(stats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--conversations", type=int, default=20)
    ap.add_argument("--select", default="every", choices=["every", "first"], help="which conversations")
    ap.add_argument("--scale", type=int, default=16, help="512-token hash blocks become 512/SCALE tokens")
    ap.add_argument("--max-input", type=int, default=768)
    ap.add_argument("--max-output", type=int, default=32)
    ap.add_argument("--time-scale", type=float, default=18.0, help="divide trace timestamps by this")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--pool-frac", type=float, default=0.10, help="device pool / working set")
    ap.add_argument("--cpu-frac", type=float, default=0.25, help="cpu tier / working set in cpu+disk")
    ap.add_argument("--policy", default="evict", choices=["evict", "finish"])
    ap.add_argument("--write-policy", default="write_through", choices=["write_through", "demote"],
                    help="cpu+disk: write every tier, or the cpu tier only with its evictions moving to disk")
    ap.add_argument("--max-batched-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--systems", default="device,cpu,cpu+disk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", default="/tmp/kvserve-bench/multiturn-model")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model = build_llama(Path(args.model_dir), SMALL_SHAPE)
    reqs = conversation_workload(args)
    ws = working_set_blocks(reqs, args.block_size)
    kv_bytes_token = 2 * SMALL_SHAPE["num_hidden_layers"] * SMALL_SHAPE["num_key_value_heads"] * \
        (SMALL_SHAPE["hidden_size"] // SMALL_SHAPE["num_attention_heads"]) * 4
    ws_bytes = ws * args.block_size * kv_bytes_token
    largest = max(math.ceil((len(r.prompt_token_ids) + r.max_tokens) / args.block_size) for r in reqs)
    pool = max(int(args.pool_frac * ws), largest)
    span = max(r.arrival_s for r in reqs)
    print(f"workload: {len(reqs)} requests from {args.conversations} conversations, "
          f"{sum(len(r.prompt_token_ids) for r in reqs)} prompt tokens, {sum(r.max_tokens for r in reqs)} output "
          f"tokens, arrivals over {span:.0f} s")
    print(f"working set {ws} blocks of {args.block_size} ({ws_bytes / 2**20:.0f} MiB fp32); device pool {pool} "
          f"blocks ({100 * pool / ws:.1f}%); largest request {largest} blocks; "
          f"ideal prefix hit rate (unbounded cache) {100 * ideal_hit_rate(reqs, args.block_size):.1f}%")
    systems = args.systems.split(",")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kv-tiers-mt-") as tmp:
        for rep in range(args.repeats):
            for name in systems:
                t = time.time()
                res = run_system(name, model, reqs, args, pool, ws_bytes, Path(tmp))
                res["repeat"] = rep
                runs.append(res)
                print(f"  [{rep}] {name:9s} p50 {res['p50_ttft_s']:.3f}s p99 {res['p99_ttft_s']:.3f}s "
                      f"hit {100 * res['hit_rate']:.1f}% (tier {100 * res['tier_hit_rate']:.1f}%) "
                      f"preempt {res['preemptions']} ({time.time() - t:.0f}s)", flush=True)
    print()
    print("| system | prefix hit rate (tier part) | p50 TTFT s | p99 TTFT s | mean TTFT s | p50 vs device |")
    print("|---|---|---|---|---|---|")
    base = median([r["p50_ttft_s"] for r in runs if r["system"] == "device"]) if "device" in systems else None
    for name in systems:
        rs = [r for r in runs if r["system"] == name]
        p50 = median([r["p50_ttft_s"] for r in rs])
        ratio = f"{base / p50:.1f}x lower" if base and name != "device" else "-"
        print(f"| {name} | {100 * median([r['hit_rate'] for r in rs]):.1f}% "
              f"({100 * median([r['tier_hit_rate'] for r in rs]):.1f}%) | {p50:.3f} | "
              f"{median([r['p99_ttft_s'] for r in rs]):.3f} | {median([r['mean_ttft_s'] for r in rs]):.3f} | {ratio} |")
    for r in runs:
        if r["tiers"]:
            print(f"tiers [{r['repeat']}] {r['system']}: {r['tiers']}")
    dump(args.json, {"args": vars(args), "working_set_blocks": ws, "pool_blocks": pool, "runs": runs})


if __name__ == "__main__":
    main()
