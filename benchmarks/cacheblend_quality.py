"""CacheBlend quality: blended prompts against full prefill, at several recompute ratios.

Each instance of an eval task (default kv_retrieval) is cut into [header, documents...,
question] (kvserve/blend/eval_segments.py).  Per instance:
1. full prefill of the concatenated tokens (the reference's exact match);
2. the same documents, in a different order, sent once as segments: every chunk is
   computed and cached (at positions other than those it is measured at);
3. the original order as segments, once per ratio: every chunk is a hit, placed with
   re-rotated keys, `ratio` of its tokens recomputed.
Reported per ratio: exact match, and against a full-precision teacher-forced prefill of
the same tokens (kvserve/eval/token_metrics.py): top-1 agreement, KL, greedy match length.
Accuracy only, no timing (safe to run anywhere).

    python benchmarks/cacheblend_quality.py --model kvserve-demo --length 1024 --docs 6 --num 40
    python benchmarks/cacheblend_quality.py --model smollm2-135m-instruct --format chat --length 1024 --docs 4 --num 12
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from kvserve import LLM, SamplingParams
from kvserve.blend.eval_segments import shuffled_order, split_instance
from kvserve.eval import tasks
from kvserve.eval.runner import REFERENCE_ENGINE, _reference_logprobs
from kvserve.eval.token_metrics import TokenMetrics, compare_sequence

RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="kvserve-demo")
    ap.add_argument("--task", default="kv_retrieval", choices=tasks.TASK_NAMES)
    ap.add_argument("--format", default="plain", choices=tasks.FORMATS)
    ap.add_argument("--length", type=int, default=1024, help="prompt length in tokens")
    ap.add_argument("--docs", type=int, default=6, help="documents the list is cut into (4-8)")
    ap.add_argument("--num", type=int, default=40, help="instances")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--sink-tokens", type=int, default=None,
                    help="compute chunks after at most this many tokens of the first segment "
                         "(default: all of it, the engine's default; 1: the BOS alone)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]

    llm = LLM(args.model, max_num_batched_tokens=16384, max_num_seqs=4)
    ref = LLM(args.model, **REFERENCE_ENGINE)
    llm.engine.core.chunk_cache.sink_tokens = args.sink_tokens
    tok = llm.get_tokenizer()
    rows: dict[str, list[torch.Tensor]] = {}
    runner = llm.engine.core.runner
    runner.sample_logprobs_hook = lambda ids, lp: [rows.setdefault(i, []).append(r.cpu()) for i, r in zip(ids, lp)]
    suite = tasks.generate_suite([args.task], [args.length], args.num, args.seed, tok, [args.format])
    correct = {"full": 0, **{str(r): 0 for r in ratios}}
    metrics = {str(r): TokenMetrics() for r in ratios}
    for k, inst in enumerate(suite):
        seg = split_instance(inst, tok, args.docs)
        flat = seg.flat()
        max_new = len(tok(inst.answer, add_special_tokens=False)["input_ids"]) + 8
        greedy = SamplingParams(temperature=0, max_tokens=max_new)
        full = llm.generate({"prompt_token_ids": flat}, greedy, use_tqdm=False)[0]
        correct["full"] += tasks.score(inst, full.outputs[0].text)
        # Cache every chunk at other positions: the documents in another order.
        llm.generate({"segments": seg.segments(shuffled_order(args.docs, args.seed + k))},
                     SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        for r in ratios:
            rows.clear()
            out = llm.generate({"segments": seg.segments(), "blend_recompute_ratio": r}, greedy, use_tqdm=False)[0]
            correct[str(r)] += tasks.score(inst, out.outputs[0].text)
            toks = list(out.outputs[0].token_ids)
            if toks:
                cand = torch.stack(rows[out.request_id][:len(toks)])
                metrics[str(r)].add(compare_sequence(_reference_logprobs(ref, flat, toks), cand, toks))
        print(f"{k + 1}/{len(suite)}: " + " ".join(f"{key}={v}" for key, v in correct.items()), file=sys.stderr)
    stats = llm.engine.core.chunk_cache.stats
    result = {"model": args.model, "task": args.task, "format": args.format, "length": args.length,
              "sink_tokens": args.sink_tokens,
              "docs": args.docs, "num": len(suite), "seed": args.seed,
              "exact_match": {key: v / len(suite) for key, v in correct.items()},
              "token_metrics": {key: m.summary() for key, m in metrics.items()},
              "chunk_hits": stats.hits, "chunk_misses": stats.misses}
    llm.close()
    ref.close()
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['model']} {result['task']}/{result['format']}/{result['length']} tokens, "
             f"{result['docs']} documents, {result['num']} instances, chunks computed after "
             + ("the first segment" if result["sink_tokens"] is None else f"{result['sink_tokens']} token(s)"),
             "| ratio | exact match | top-1 agreement | KL (nats) | greedy match |",
             "|---|---|---|---|---|",
             f"| full prefill | {result['exact_match']['full']:.3f} | 1 | 0 | - |"]
    for key, m in result["token_metrics"].items():
        if not m.get("tokens"):
            lines.append(f"| {key} | {result['exact_match'][key]:.3f} | - | - | - |")
            continue
        lines.append(f"| {key} | {result['exact_match'][key]:.3f} | {m['top1_agreement']:.4f} | "
                     f"{m['kl_mean']:.3e} | {m['greedy_match_mean']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
