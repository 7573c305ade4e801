#!/usr/bin/env python
"""Restart: a new engine process serves a repeated long context from the disk tier.

  1. writer process:   a cold engine with `disk:DIR` ("finish" policy) serves CONTEXT + question 0,
                       then closes (queued saves are written);
  2. --repeats times, alternating, each a fresh process (model loaded, one tiny warm-up request):
       disk:      an engine on the same DIR serves CONTEXT + question i  (the context comes from disk)
       recompute: an engine without tiers serves the same prompt         (the context is prefilled)
  TTFT is measured in-process from RequestOutput.metrics; model loading is not part of it.

The model is random-weight with SmolLM2-135M's shape (30 layers, hidden 576, 3 KV heads), fp32,
so the KV of 2,000 tokens is ~88 MiB and its prefill costs seconds on a CPU.

    python benchmarks/kv_tiers_restart.py                 # 2,000-token context, 3 repeats
    python benchmarks/kv_tiers_restart.py --codec cachegen
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kv_tiers_common import SMOL135_SHAPE, build_llama, median, tier_summary

HERE = Path(__file__).resolve()


def prompt(args: argparse.Namespace, question: int) -> list[int]:
    rng = random.Random(args.seed)
    context = [rng.randrange(100, SMOL135_SHAPE["vocab_size"]) for _ in range(args.context_len)]
    qrng = random.Random(args.seed * 1000 + question + 1)
    return context + [qrng.randrange(100, SMOL135_SHAPE["vocab_size"]) for _ in range(args.question_len)]


def child(args: argparse.Namespace) -> None:
    """One engine process: warm up, serve one prompt, print a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from kvserve import SamplingParams
    from kvserve.engine.llm_engine import LLMEngine

    kw = {}
    if args.phase in ("write", "disk"):
        kw = dict(kv_tiers=f"disk:{args.disk}:4GiB", kv_codec=args.codec, kv_offload_policy="finish")
    t_load = time.perf_counter()
    engine = LLMEngine(args.model, block_size=16, max_num_batched_tokens=args.max_batched_tokens,
                       kv_cache_memory=1 << 30, max_model_len=4096, **kw)
    load_s = time.perf_counter() - t_load
    try:
        engine.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2), request_id="warm")
        while engine.has_unfinished_requests():
            engine.step()
        ids = prompt(args, args.question)
        engine.add_request({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                           request_id="q")
        out = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished and o.request_id == "q":
                    out = o
        assert out is not None
        m = out.metrics
        t_close = time.perf_counter()
        stats = engine.kv_tier_stats()
    finally:
        engine.close()
    print(json.dumps({"phase": args.phase, "ttft_s": m.first_token_time - m.arrival_time,
                      "cached_tokens": out.num_cached_tokens, "prompt_len": len(ids),
                      "tokens": out.outputs[0].token_ids, "load_model_s": load_s,
                      "close_s": time.perf_counter() - t_close, "tiers": tier_summary(stats)}))


def run_child(args: argparse.Namespace, phase: str, question: int, disk: str) -> dict:
    cmd = [sys.executable, str(HERE), "--child", "--phase", phase, "--question", str(question), "--disk", disk,
           "--model", args.model, "--codec", args.codec, "--context-len", str(args.context_len),
           "--question-len", str(args.question_len), "--threads", str(args.threads), "--seed", str(args.seed),
           "--max-batched-tokens", str(args.max_batched_tokens)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{phase} process failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/smol135", help="built (SmolLM2-135M shape) if missing")
    ap.add_argument("--context-len", type=int, default=2000)
    ap.add_argument("--question-len", type=int, default=16)
    ap.add_argument("--codec", default="raw")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    # child-process arguments
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="", help=argparse.SUPPRESS)
    ap.add_argument("--question", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--disk", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    build_llama(Path(args.model), SMOL135_SHAPE)
    with tempfile.TemporaryDirectory(prefix="kv-tiers-restart-") as disk:
        w = run_child(args, "write", 0, disk)
        print(f"writer: cold TTFT {w['ttft_s']:.2f}s, wrote {w['tiers']['0:disk']['MiB_written']} MiB "
              f"(close/flush {w['close_s']:.2f}s)", flush=True)
        runs = []
        for i in range(1, args.repeats + 1):
            for phase in ("disk", "recompute"):
                r = run_child(args, phase, i, disk)
                runs.append(r)
                print(f"  [{i}] {phase:9s} TTFT {r['ttft_s']:.3f}s cached {r['cached_tokens']}/{r['prompt_len']}",
                      flush=True)
        for i in range(1, args.repeats + 1):
            a = [r for r in runs if r["phase"] == "disk"][i - 1]
            b = [r for r in runs if r["phase"] == "recompute"][i - 1]
            if args.codec == "raw" and a["tokens"] != b["tokens"]:
                print(f"  note: repeat {i}: tokens differ from recompute: {a['tokens']} vs {b['tokens']}")
    disk_ttft = median([r["ttft_s"] for r in runs if r["phase"] == "disk"])
    rec_ttft = median([r["ttft_s"] for r in runs if r["phase"] == "recompute"])
    print()
    print("| context | codec | recompute TTFT (median) | disk-tier TTFT after restart (median) | speedup |")
    print("|---|---|---|---|---|")
    print(f"| {args.context_len} + {args.question_len} tokens | {args.codec} | {rec_ttft:.3f} s | {disk_ttft:.3f} s "
          f"| {rec_ttft / disk_ttft:.1f}x |")
    last = [r for r in runs if r["phase"] == "disk"][-1]["tiers"]
    print(f"disk tier (last reader): {last}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "writer": w, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
