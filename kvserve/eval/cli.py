"""`kvserve eval [MODEL]`: what an engine configuration costs in accuracy.

    kvserve eval                                   # the demo model (kvserve-demo), default engine
    kvserve eval --kv-tiers cpu:1GiB --kv-codec int8 --json int8.json
    kvserve eval /path/to/random-model --no-accuracy --lengths 512,1024
    kvserve eval smollm2-135m-instruct --no-accuracy --kv-tiers cpu:1GiB --kv-codec cachegen
                                                   # real model, real (ShareGPT) prompts

See kvserve/eval/runner.py for what is measured.  Bad input: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvserve.entrypoints.serve_cli import parse_size  # the same sizes as `kvserve serve --kv-cache-memory`
from kvserve.eval import tasks

EXIT_BAD_INPUT = 2


def _csv(kind: type) -> Any:
    def parse(text: str) -> list:
        try:
            items = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__}: {text!r}") from exc
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items

    return parse


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """LLM(...) keyword arguments from the engine flags; unset flags keep the engine's defaults."""
    kw: dict[str, Any] = {"dtype": args.dtype, "block_size": args.block_size,
                          "enable_prefix_caching": not args.no_prefix_caching,
                          "attention_backend": args.attention_backend, "seed": args.seed}
    for name in ("tokenizer", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "num_kv_blocks",
                 "max_model_len", "kv_tiers", "blend_recompute_ratio"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    if args.kv_tiers:
        kw["kv_codec"] = args.kv_codec
    elif args.kv_codec != "raw":
        raise ValueError("--kv-codec applies to KV tiers; give --kv-tiers too")
    return kw


def _run(args: argparse.Namespace) -> int:
    from kvserve.eval.runner import EvalSettings, format_tables, run_eval

    try:
        for t in args.tasks:
            if t not in tasks.TASK_NAMES:
                raise ValueError(f"unknown task {t!r}; choose from {', '.join(tasks.TASK_NAMES)}")
        for f in args.formats:
            if f not in tasks.FORMATS:
                raise ValueError(f"unknown format {f!r}; choose from {', '.join(tasks.FORMATS)}")
        if min(args.lengths) < 64:
            raise ValueError("--lengths must be >= 64 tokens")
        if args.num_per_cell < 1 or args.token_prompts < 1 or args.token_len < 1 or args.sharegpt_max_len < 8:
            raise ValueError("--num-per-cell, --token-prompts and --token-len must be >= 1, --sharegpt-max-len >= 8")
        settings = EvalSettings(tasks=args.tasks, lengths=args.lengths, formats=args.formats,
                                num_per_cell=args.num_per_cell, seed=args.seed, accuracy=not args.no_accuracy,
                                token_metrics=not args.no_token_metrics, token_prompts=args.token_prompts,
                                token_len=args.token_len, batch=args.batch, token_source=args.token_source,
                                sharegpt=args.sharegpt, sharegpt_max_len=args.sharegpt_max_len,
                                segments=args.segments)
        if args.segments and not 2 <= args.segments <= 62:
            raise ValueError("--segments must be between 2 and 62 documents")
        if not settings.accuracy and not settings.token_metrics:
            raise ValueError("nothing to do: both --no-accuracy and --no-token-metrics")
        kwargs = engine_kwargs(args)
        result = run_eval(args.model, kwargs, settings, log=lambda s: print(s, file=sys.stderr, flush=True))
    except (ValueError, FileNotFoundError) as exc:
        print(f"kvserve eval: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"\nkvserve eval: {result.model} ({result.seconds:.0f} s)\n")
    print(format_tables(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="task accuracy and token agreement of an engine configuration",
        description="Exact-match accuracy on held-out synthetic tasks (per task, format and context length) and "
                    "token-level agreement (top-1, KL, greedy match length, reference perplexity) with a "
                    "full-precision reference, on retrieval prompts or real ShareGPT prompts.  Seeded and "
                    "deterministic.  Default model: the built-in demo model (kvserve-demo).")
    p.add_argument("model", nargs="?", default=None,
                   help="HF model directory, .gguf file or built-in name (smollm2-135m-instruct, kvserve-demo); "
                        "default: kvserve-demo")
    g = p.add_argument_group("suite")
    g.add_argument("--tasks", type=_csv(str), default=list(tasks.TASK_NAMES), help="comma-separated task names")
    g.add_argument("--lengths", type=_csv(int), default=[256, 512, 1024, 2048], help="context lengths in tokens")
    g.add_argument("--formats", type=_csv(str), default=["plain"], help="plain,chat")
    g.add_argument("--num-per-cell", type=int, default=50, help="instances per task/format/length")
    g.add_argument("--seed", type=int, default=1234, help="suite seed (and engine seed)")
    g.add_argument("--no-accuracy", action="store_true", help="skip the task accuracy")
    g.add_argument("--no-token-metrics", action="store_true", help="skip the token metrics against the reference")
    g.add_argument("--token-prompts", type=int, default=8, help="prompts per length for the token metrics")
    g.add_argument("--token-len", type=int, default=32, help="continuation tokens scored per prompt")
    g.add_argument("--token-source", choices=("auto", "retrieval", "sharegpt"), default="auto",
                   help="prompts of the token metrics: kv_retrieval prompts per --lengths, or real ShareGPT "
                        "prompts through the chat template (auto: sharegpt for a chat model other than kvserve-demo)")
    g.add_argument("--sharegpt", default=None, metavar="FILE",
                   help="ShareGPT JSON for --token-source sharegpt (default: the 64 prompts packaged in "
                        "kvserve/eval/data/sharegpt_sample.json)")
    g.add_argument("--sharegpt-max-len", type=int, default=512, help="tokens per templated ShareGPT prompt")
    g.add_argument("--batch", type=int, default=16, help="requests submitted together")
    g.add_argument("--json", default=None, help="write the full results as JSON here")
    g.add_argument("--segments", type=int, default=0, metavar="N",
                   help="CacheBlend: cut each prompt's list into N documents (segments), send them once in "
                        "another order (cached), then measure in the original order (docs/cacheblend.md)")
    e = p.add_argument_group("engine under test (kvserve.LLM options)")
    e.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    e.add_argument("--attention-backend", default="auto", help="auto, cpu, torch or reference")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--max-num-seqs", type=int, default=None)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--kv-cache-memory", type=parse_size, default=None, help="e.g. 2GiB")
    e.add_argument("--num-kv-blocks", type=int, default=None)
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--blend-recompute-ratio", type=float, default=None,
                   help="CacheBlend: share of cached document tokens recomputed (default 0.15)")
    e.add_argument("--kv-tiers", default=None, help='e.g. "cpu:1GiB" or "cpu:1GiB,disk:/tmp/kv:4GiB"; each '
                                                    "measured request then loads its prompt KV from the tiers")
    e.add_argument("--kv-codec", default="raw", help="codec of the tiers: raw, int8, fp8, cachegen")
    p.set_defaults(func=_run)
