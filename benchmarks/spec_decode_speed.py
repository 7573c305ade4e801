#!/usr/bin/env python
"""Speculative decoding in the engine: decode tokens/s per proposer against no speculation.

Model: SmolLM2-135M-Instruct (`smollm2-135m-instruct`, the built-in GGUF) unless --model says
otherwise.  Workloads (prompts from the real ShareGPT file in shared/data, through the model's
chat template; kvserve.spec_decode.measure.workload_prompts):
  edit      "Rewrite this paragraph with one word changed: <a ShareGPT prompt>": the answer
            repeats its input (what n-gram and suffix lookup are for)
  sharegpt  the ShareGPT prompts themselves
Scenarios, each run through kvserve.LLM (the real scheduler, paged KV, model runner):
  batch 1   --num-prompts prompts, one at a time
  batch 8   8 prompts at once
  batch 64  (--large-batch) 64 ShareGPT prompts at once: adaptive speculation against off
Methods: off, then each of --methods with fixed k (= --k) and with adaptive k ("+adaptive"):
  ngram, suffix  the lookup proposers
  draft          a draft model batched on its own paged KV pool (kvserve/spec_decode/paged_draft.py):
                 by default an early-exit draft of the target (its first --draft-layers layers with
                 its norm and head, written once by kvserve.spec_decode.truncated_draft), the only
                 draft with SmolLM2's tokenizer at hand; draft:PATH for any other model directory

One engine is loaded once; a method is swapped in as the scheduler's SpecScheduling before its
run (a fresh one each run: the adaptive policy learns acceptance and step times from scratch,
inside the timed run), and the prefix cache is emptied before each run.  Runs are interleaved
(every method once per repeat, in order), and each figure is the median over --repeats.

decode tokens/s of a run = sum over its requests of (output tokens - 1) / (last finish - first
first token): generation after the first token (the prefill), per second of wall time.
Greedy, max_tokens --max-tokens, EOS honoured.  Every output is checked identical to the
same repeat's no-speculation output ("same").  Acceptance (proposed, accepted, mean accepted
length) is the engine's own SpecDecodeMetrics.

    python benchmarks/spec_decode_speed.py                         # all scenarios, 3 repeats
    python benchmarks/spec_decode_speed.py --methods ngram,suffix,draft:/path/to/draft --json sd.json
    python benchmarks/spec_decode_speed.py --methods draft --draft-layers 12 --batches 1 --large-batch 0
    python benchmarks/spec_decode_speed.py --model /tmp/tiny --repeats 1 --max-tokens 16   # a smoke run
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.bench.paths import shared_data_dir  # noqa: E402
import torch  # noqa: E402

from kvserve.spec_decode.config import SpeculativeConfig  # noqa: E402
from kvserve.spec_decode.measure import workload_prompts  # noqa: E402
from kvserve.spec_decode.paged_draft import PagedDraftProposer  # noqa: E402
from kvserve.spec_decode.scheduling import SpecScheduling, draft_pool_blocks  # noqa: E402
from kvserve.spec_decode.truncated_draft import parse_layers, write_truncated_draft  # noqa: E402


def chat_prompts(llm: LLM, workload: str, n: int, max_prompt_tokens: int) -> list[list[int]]:
    tok = llm.get_tokenizer()
    out = []
    for text in workload_prompts(workload, 4 * n, shared_data_dir()):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if len(ids) <= max_prompt_tokens:
            out.append([int(t) for t in ids])
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(f"only {len(out)} {workload} prompts of <= {max_prompt_tokens} tokens")
    return out


def draft_path(method: str, llm: LLM, args: argparse.Namespace) -> Optional[str]:
    """The draft model directory of a draft method: "draft:PATH", or "draft" for an early-exit
    draft of the target (its first --draft-layers layers, written once to --draft-dir)."""
    name = method.partition("+")[0]
    if name.startswith("draft:"):
        return name[len("draft:"):]
    if name != "draft":
        return None
    target = llm.engine.config.model.model
    layers = parse_layers(args.draft_keep_layers) if args.draft_keep_layers else list(range(args.draft_layers))
    tag = hashlib.sha256(f"{Path(target).resolve()}|{layers}".encode()).hexdigest()[:12]
    out = Path(args.draft_dir or Path(tempfile.gettempdir()) / f"kvserve-draft-{tag}")
    if not (out / "config.json").is_file():
        write_truncated_draft(target, out, layers=layers)
    return str(out)


_PROPOSERS: dict[str, Any] = {}  # draft model -> its loaded PagedDraftProposer (one load per run of the script)


def make_spec(llm: LLM, method: str, args: argparse.Namespace) -> Optional[SpecScheduling]:
    """None for "off"; "ngram", "suffix", "draft", "draft:PATH", each optionally "+adaptive".
    A draft model is loaded once, on its own paged pool sized from the engine's (as the engine
    sizes it for --speculative-method draft:PATH); each run gets a fresh policy."""
    if method == "off":
        return None
    name, _, mode = method.partition("+")
    cfg = llm.engine.config
    core = llm.engine.core
    draft = draft_path(method, llm, args)
    proposer = None
    if draft is not None:
        name = f"draft:{draft}"
        proposer = _PROPOSERS.get(draft)
        if proposer is None:
            bs = cfg.cache.block_size
            blocks = draft_pool_blocks(core.kv_manager.num_blocks, bs, cfg.scheduler.max_num_seqs, args.k)
            proposer = _PROPOSERS[draft] = PagedDraftProposer.load(
                draft, num_blocks=blocks, block_size=bs, dtype=getattr(torch, cfg.model.dtype),
                device=cfg.device.device, attention_backend=cfg.device.attention_backend,
                target_vocab_size=core.vocab_size)
        assert proposer.pool.num_free == proposer.pool.num_blocks, "draft KV left over from the last run"
    return SpecScheduling.build(SpeculativeConfig(name, args.k, adaptive=mode == "adaptive"),
                                vocab_size=core.vocab_size, device=cfg.device.device,
                                dtype=cfg.model.dtype, clock=core.clock, proposer=proposer)


def run_once(llm: LLM, groups: list[list[list[int]]], sp: SamplingParams,
             spec: Optional[SpecScheduling]) -> dict[str, Any]:
    """Generate each group (a batch run at once); decode tokens and seconds summed over groups."""
    core = llm.engine.core
    core.scheduler.spec = spec
    tokens, seconds, outputs = 0, 0.0, []
    forwards0 = getattr(spec.manager.proposer, "num_forwards", 0) if spec is not None else 0
    for group in groups:
        core.reset_prefix_cache()
        outs = llm.generate([{"prompt_token_ids": p} for p in group], sp, use_tqdm=False)
        firsts = [o.metrics.first_token_time for o in outs]
        lasts = [o.metrics.finish_time for o in outs]
        assert None not in firsts and None not in lasts, "a finished request without its times"
        first = min(t for t in firsts if t is not None)
        last = max(t for t in lasts if t is not None)
        tokens += sum(max(0, len(o.outputs[0].token_ids) - 1) for o in outs)
        seconds += last - first
        outputs += [list(o.outputs[0].token_ids) for o in outs]
    res: dict[str, Any] = {"decode_tok_s": tokens / seconds if seconds > 0 else 0.0, "decode_tokens": tokens,
                           "outputs": outputs}
    if spec is not None:
        res["spec"] = spec.metrics.as_dict()
        proposer = spec.manager.proposer
        if isinstance(proposer, PagedDraftProposer):
            res["spec"]["draft_forwards"] = proposer.num_forwards - forwards0
    core.scheduler.spec = None
    return res


def run_scenario(llm: LLM, name: str, groups: list[list[list[int]]], methods: list[str], args: argparse.Namespace,
                 sp: SamplingParams) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for rep in range(args.repeats):
        off_outputs = None
        for m in methods:
            r = run_once(llm, groups, sp, make_spec(llm, m, args))
            if m == "off":
                off_outputs = r["outputs"]
            r["same"] = off_outputs is not None and r["outputs"] == off_outputs
            runs[m].append(r)
            print(f"  [{name}] repeat {rep + 1}/{args.repeats} {m:>16}: {r['decode_tok_s']:8.2f} decode tok/s"
                  + ("" if r["same"] else "  OUTPUTS DIFFER"), flush=True)
    off = statistics.median(r["decode_tok_s"] for r in runs["off"])
    table = {}
    for m, rs in runs.items():
        tps = statistics.median(r["decode_tok_s"] for r in rs)
        row: dict[str, Any] = {"decode_tok_s": tps, "speedup": tps / off if off else None,
                               "all_runs_tok_s": [r["decode_tok_s"] for r in rs], "same": all(r["same"] for r in rs)}
        if "spec" in rs[-1]:
            s = rs[-1]["spec"]
            row.update(acceptance_rate=s["acceptance_rate"], mean_acceptance_length=s["mean_acceptance_length"],
                       num_draft_tokens=s["num_draft_tokens"], acceptance_rate_per_position=s["acceptance_rate_per_position"])
            if "draft_forwards" in s:
                row["draft_forwards"] = s["draft_forwards"]
        table[m] = row
    return table


def print_table(name: str, table: dict[str, Any]) -> None:
    print(f"\n{name}")
    print(f"  {'method':>16}  {'decode tok/s':>12}  {'vs off':>7}  {'acceptance':>10}  {'mean len':>8}  same")
    for m, r in table.items():
        acc = f"{r['acceptance_rate']:.3f}" if "acceptance_rate" in r else "-"
        mal = f"{r['mean_acceptance_length']:.2f}" if "mean_acceptance_length" in r else "-"
        print(f"  {m:>16}  {r['decode_tok_s']:12.2f}  {r['speedup']:6.3f}x  {acc:>10}  {mal:>8}  {r['same']}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--methods", default="ngram,suffix,draft",
                   help="comma-separated: ngram, suffix, draft (an early-exit draft of the target), draft:PATH")
    p.add_argument("--draft-layers", type=int, default=8,
                   help='"draft": keep the target\'s first N decoder layers (and its norm and head)')
    p.add_argument("--draft-keep-layers", default=None,
                   help='"draft": keep these decoder layers instead, e.g. 0-9,24-29 (a layer-skipping draft)')
    p.add_argument("--draft-dir", default=None, help='"draft": where to write it (default: a temp directory)')
    p.add_argument("--k", type=int, default=4, help="--num-speculative-tokens (the most drafts per step)")
    p.add_argument("--workloads", default="edit,sharegpt")
    p.add_argument("--batches", default="1,8", help="batch sizes of the per-proposer scenarios")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts of the batch-1 scenario (run one by one)")
    p.add_argument("--large-batch", type=int, default=64, help="the adaptive-vs-off batch on ShareGPT (0: skip)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=640)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes (default: the engine's)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    kw: dict[str, Any] = dict(dtype=args.dtype, max_num_seqs=max(64, args.large_batch))
    if args.kv_cache_memory:
        kw["kv_cache_memory"] = args.kv_cache_memory
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    report: dict[str, Any] = {"model": args.model, "k": args.k, "max_tokens": args.max_tokens,
                              "repeats": args.repeats, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "scenarios": {}}
    with LLM(args.model, **kw) as llm:
        warm = chat_prompts(llm, "sharegpt", 1, args.max_prompt_tokens)
        llm.generate([{"prompt_token_ids": warm[0]}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        all_methods = ["off"] + [m + suffix for m in methods for suffix in ("", "+adaptive")]
        for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
            for batch in [int(b) for b in args.batches.split(",") if b.strip()]:
                n = args.num_prompts if batch == 1 else batch
                prompts = chat_prompts(llm, workload, n, args.max_prompt_tokens)
                groups = [[q] for q in prompts] if batch == 1 else [prompts]
                name = f"{workload}, batch {batch}"
                report["scenarios"][name] = table = run_scenario(llm, name, groups, all_methods, args, sp)
                print_table(name, table)
        if args.large_batch:
            prompts = chat_prompts(llm, "sharegpt", args.large_batch, args.max_prompt_tokens)
            name = f"sharegpt, batch {args.large_batch}"
            large = ["off"] + [m + "+adaptive" for m in methods] + [methods[0]]
            report["scenarios"][name] = table = run_scenario(llm, name, [prompts], large, args, sp)
            print_table(name, table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
