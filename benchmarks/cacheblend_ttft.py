"""CacheBlend speed: time to first token of prompts built from cached documents.

Timing: run on a quiet machine (the numbers in docs/cacheblend.md come from the lead's runs).

    docs   a 4 x 512-token-document prompt (plus a header and a question): full prefill vs
           blended at each --ratios, documents cached beforehand in other orders; each
           repetition uses another document order and question, so nothing after the header
           is a prefix-cache hit
    rag    20 documents, 200 requests each drawing 4 (shuffled) plus a question: prefix caching
           alone (plain prompts) vs segments (blended), same requests in the same order

    python benchmarks/cacheblend_ttft.py docs --model smollm2-135m-instruct --reps 8
    python benchmarks/cacheblend_ttft.py rag --model smollm2-135m-instruct --requests 200

Documents are key-value lines (kvserve/eval/tasks.py's format) cut to exactly --doc-tokens
tokens.  Requests run one at a time (TTFT without queueing): ttft = first token time - arrival.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from kvserve import LLM, SamplingParams

ONE = SamplingParams(temperature=0, max_tokens=1)


def make_docs(tok: Any, n: int, doc_tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < doc_tokens:
            key = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
            ids += tok.encode(f"{key}: {rng.randrange(1000, 10000)}\n", add_special_tokens=False)
        docs.append(ids[:doc_tokens])
    return docs


def _ttft(out: Any) -> float:
    m = out.metrics
    return m.first_token_time - m.arrival_time


def _header_question(tok: Any, i: int) -> tuple[list[int], list[int]]:
    head = tok.encode("Below is a list of keys and values.\n")
    q = tok.encode(f"Question {i}: what is the value of the key on line {i}?\nAnswer: ", add_special_tokens=False)
    return head, q


def run_docs(args: argparse.Namespace) -> dict[str, Any]:
    # "finish": computed chunks go down to the tiers at once (so they are there after the reset below).
    llm = LLM(args.model, max_num_batched_tokens=16384, max_num_seqs=4, kv_tiers=args.kv_tiers,
              kv_offload_policy="finish" if args.kv_tiers else "auto")
    tok = llm.get_tokenizer()
    docs = make_docs(tok, 4, args.doc_tokens, args.seed)
    orders = list(itertools.permutations(range(4)))
    random.Random(args.seed).shuffle(orders)
    results: dict[str, list[float]] = {"full": []}
    # Warm up the kernels once (not measured).
    llm.generate({"prompt_token_ids": [t for d in docs for t in d]}, ONE, use_tqdm=False)
    for rep in range(args.reps):
        head, q = _header_question(tok, rep)
        order = orders[rep % len(orders)]
        plain = head + [t for i in order for t in docs[i]] + q
        llm.engine.core.reset_prefix_cache()  # full prefill: nothing cached
        results["full"].append(_ttft(llm.generate({"prompt_token_ids": plain}, ONE, use_tqdm=False)[0]))
        # Cache the chunks in another order (not measured), then measure the blended prompt.
        other = orders[(rep + 7) % len(orders)]
        llm.generate({"segments": [head, *[docs[i] for i in other], q[:1]]}, ONE, use_tqdm=False)
        for r in args.ratios:
            if args.kv_tiers:  # the chunks must come from the tiers (at every ratio): empty the device cache
                llm.engine.core.wait_for_kv_saves(60)
                llm.engine.core.reset_prefix_cache()
            segs = {"segments": [head, *[docs[i] for i in order], q], "blend_recompute_ratio": r}
            results.setdefault(str(r), []).append(_ttft(llm.generate(segs, ONE, use_tqdm=False)[0]))
    stats = llm.engine.core.chunk_cache.stats
    llm.close()
    summary = {k: {"median_s": statistics.median(v), "mean_s": statistics.mean(v), "runs": v}
               for k, v in results.items()}
    full = summary["full"]["median_s"]
    print(f"{args.model}: 4 x {args.doc_tokens}-token documents, {args.reps} reps, tiers={args.kv_tiers}")
    print("| prompt | median TTFT (s) | speedup vs full prefill |\n|---|---|---|")
    for k, s in summary.items():
        label = "full prefill" if k == "full" else f"blended, ratio {k}"
        print(f"| {label} | {s['median_s']:.3f} | {full / s['median_s']:.2f}x |")
    print(f"chunk hits {stats.hits} (from tiers {stats.tier_hits}), misses {stats.misses}, fallbacks {stats.fallbacks}")
    return {"case": "docs", "summary": summary, "chunk_hits": stats.hits, "chunk_tier_hits": stats.tier_hits,
            "chunk_misses": stats.misses}


def run_rag(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"case": "rag"}
    rng = random.Random(args.seed)
    draws = [rng.sample(range(args.num_docs), 4) for _ in range(args.requests)]
    for mode in ("prefix", "blend"):
        llm = LLM(args.model, max_num_batched_tokens=16384, max_num_seqs=4)
        tok = llm.get_tokenizer()
        docs = make_docs(tok, args.num_docs, args.doc_tokens, args.seed)
        ttfts = []
        t0 = time.perf_counter()
        for i, draw in enumerate(draws):
            head, q = _header_question(tok, i)
            segs = [head, *[docs[d] for d in draw], q]
            prompt = ({"segments": segs, "blend_recompute_ratio": args.ratio} if mode == "blend"
                      else {"prompt_token_ids": [t for s in segs for t in s]})
            ttfts.append(_ttft(llm.generate(prompt, SamplingParams(temperature=0, max_tokens=args.max_tokens),
                                            use_tqdm=False)[0]))
        wall = time.perf_counter() - t0
        kv = llm.engine.core.kv_manager
        st = llm.engine.core.chunk_cache.stats
        out[mode] = {"wall_s": wall, "ttft_median_s": statistics.median(ttfts), "ttft_mean_s": statistics.mean(ttfts),
                     "prefix_hit_rate": kv.prefix_cache_hit_rate(), "chunk_hits": st.hits, "chunk_misses": st.misses,
                     "recomputed_fraction": st.recomputed_fraction()}
        llm.close()
    print(f"RAG: {args.num_docs} documents of {args.doc_tokens} tokens, {args.requests} requests drawing 4, "
          f"ratio {args.ratio}, {args.max_tokens} output tokens")
    print("| mode | wall (s) | median TTFT (s) | mean TTFT (s) | prefix hit rate | chunk hits / misses |")
    print("|---|---|---|---|---|---|")
    for mode in ("prefix", "blend"):
        s = out[mode]
        print(f"| {'prefix caching alone' if mode == 'prefix' else 'segments (CacheBlend)'} | {s['wall_s']:.1f} | "
              f"{s['ttft_median_s']:.3f} | {s['ttft_mean_s']:.3f} | {s['prefix_hit_rate']:.3f} | "
              f"{s['chunk_hits']} / {s['chunk_misses']} |")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=["docs", "rag"])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--doc-tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=8, help="docs: repetitions per prompt kind")
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.15],
                    help="docs: recompute ratios to time, e.g. 0,0.15,0.3")
    ap.add_argument("--kv-tiers", default=None, help="docs: e.g. cpu:2GiB or disk:/tmp/kvs:4GiB (chunks from there)")
    ap.add_argument("--num-docs", type=int, default=20, help="rag: documents in the pool")
    ap.add_argument("--requests", type=int, default=200, help="rag: requests")
    ap.add_argument("--ratio", type=float, default=0.15, help="rag: recompute ratio")
    ap.add_argument("--max-tokens", type=int, default=8, help="rag: output tokens per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run_docs(args) if args.case == "docs" else run_rag(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
