#!/usr/bin/env python
"""Sharing: two live engine processes on one Redis; the second gets hits for the first's prefixes.

  A (process 1): an engine with `redis://...` ("finish" policy) serves --docs documents of
                 --doc-len tokens, each with question 0; it waits until its saves are in Redis,
                 reports, and stays up (alive, same Redis) while B runs;
  B (process 2): an engine on the same Redis serves the same documents with question 1, one
                 request at a time (TTFT without queueing);
  C (process 3): an engine without tiers serves B's prompts: the recompute baseline.

Documents are random tokens from a fresh seed per run (printed), so nothing a previous run left
in Redis can be a hit.  Model: random-weight, SmolLM2-135M-shaped, fp32.

    bash scripts/start_redis.sh 6379          # if no Redis is running
    python benchmarks/kv_tiers_sharing.py
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from kv_tiers_common import SMOL135_SHAPE, build_llama, median, tier_summary

HERE = Path(__file__).resolve()


def prompts(args: argparse.Namespace, question: int) -> list[list[int]]:
    out = []
    for d in range(args.docs):
        rng = random.Random(args.seed * 7919 + d)
        doc = [rng.randrange(100, SMOL135_SHAPE["vocab_size"]) for _ in range(args.doc_len)]
        q = random.Random(args.seed * 7919 + 1000 * (question + 1) + d)
        out.append(doc + [q.randrange(100, SMOL135_SHAPE["vocab_size"]) for _ in range(args.question_len)])
    return out


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from kvserve import SamplingParams
    from kvserve.engine.llm_engine import LLMEngine

    kw = {} if args.role == "C" else dict(kv_tiers=args.redis, kv_offload_policy="finish")
    engine = LLMEngine(args.model, block_size=16, max_num_batched_tokens=2048, kv_cache_memory=1 << 30,
                       max_model_len=4096, **kw)
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request({"prompt_token_ids": [5, 6, 7]}, sp, request_id="warm")
    while engine.has_unfinished_requests():
        engine.step()
    results = []
    for i, ids in enumerate(prompts(args, 0 if args.role == "A" else 1)):
        engine.add_request({"prompt_token_ids": ids}, sp, request_id=str(i))
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished and o.request_id == str(i):
                    m = o.metrics
                    results.append({"ttft_s": m.first_token_time - m.arrival_time, "cached": o.num_cached_tokens,
                                    "prompt_len": len(ids), "tokens": o.outputs[0].token_ids})
    engine.core.wait_for_kv_saves(120)  # A's blocks are in Redis before B starts
    print(json.dumps({"role": args.role, "results": results, "tiers": tier_summary(engine.kv_tier_stats())}),
          flush=True)
    if args.role == "A":
        sys.stdin.readline()  # stay alive (engine and Redis connection up) until told to stop
    engine.close()


def spawn(args: argparse.Namespace, role: str) -> subprocess.Popen:
    cmd = [sys.executable, str(HERE), "--child", "--role", role, "--model", args.model, "--redis", args.redis,
           "--docs", str(args.docs), "--doc-len", str(args.doc_len), "--question-len", str(args.question_len),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def report_line(p: subprocess.Popen, role: str) -> dict:
    assert p.stdout is not None
    for line in p.stdout:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{role} failed:\n{p.stderr.read()[-3000:] if p.stderr else ''}")


def redis_up(url: str) -> bool:
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    try:
        with socket.create_connection((host, int(port or 6379)), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/smol135")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/13?ttl=900")
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--doc-len", type=int, default=768)
    ap.add_argument("--question-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=None, help="default: fresh per run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--role", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if not redis_up(args.redis):
        sys.exit(f"no Redis at {args.redis}; start one with: bash scripts/start_redis.sh 6379")
    if args.seed is None:
        args.seed = int(time.time()) % 1_000_000
    print(f"documents: {args.docs} x {args.doc_len} tokens + {args.question_len}-token questions, seed {args.seed}")
    build_llama(Path(args.model), SMOL135_SHAPE)
    a = spawn(args, "A")
    try:
        ra = report_line(a, "A")
        print(f"A (alive): served {len(ra['results'])} prompts, cached tokens {[r['cached'] for r in ra['results']]}, "
              f"tiers {ra['tiers']}", flush=True)
        b = spawn(args, "B")
        rb = report_line(b, "B")
        b.wait()
    finally:
        if a.stdin:
            a.stdin.write("\n")
            a.stdin.flush()
        a.wait(60)
    c = spawn(args, "C")
    rc = report_line(c, "C")
    c.wait()
    print(f"B: tiers {rb['tiers']}")
    print()
    print("| request | B cached tokens (from A via Redis) | B TTFT | C TTFT (no tiers) | speedup |")
    print("|---|---|---|---|---|")
    for i, (x, y) in enumerate(zip(rb["results"], rc["results"])):
        same = "" if x["tokens"] == y["tokens"] else " (tokens differ)"
        print(f"| doc {i} | {x['cached']}/{x['prompt_len']} | {x['ttft_s']:.3f} s | {y['ttft_s']:.3f} s | "
              f"{y['ttft_s'] / x['ttft_s']:.1f}x{same} |")
    mb, mc = median([x["ttft_s"] for x in rb["results"]]), median([y["ttft_s"] for y in rc["results"]])
    print(f"| median | | {mb:.3f} s | {mc:.3f} s | {mc / mb:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "A": ra, "B": rb, "C": rc}, indent=1))


if __name__ == "__main__":
    main()
