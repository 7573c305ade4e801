"""Acceptance of greedy draft models at fixed k, from one teacher-forced pass of each draft.

With a greedy target and a greedy draft, a step's drafts are accepted exactly while the draft's
argmax after each committed prefix is the target's next token: accepted drafts *are* the target's
tokens, so at every position the draft is asked about, its context is the committed sequence.
The fixed-k speculative loop's acceptance therefore follows from

    agree[p] = (argmax of the draft after seq[:p]) == seq[p]

on the target's greedy sequence `seq` (one target decode, then one forward per draft over the
whole sequence): from committed length c, the step accepts the run of agreements
agree[c], agree[c+1], ... (at most k) and commits one token more.  Much cheaper than running the
loop per draft (on a loaded machine, what choosing the early-exit depth needs), and held equal to
the reference loop (kvserve.spec_decode.reference) by tests/unit/spec_decode/test_draft_agreement.py.

    python -m kvserve.spec_decode.draft_agreement --drafts /tmp/d6 /tmp/d12 --workload edit
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from kvserve.spec_decode.dense_runner import DenseModelRunner
from kvserve.spec_decode.metrics import SpecDecodeMetrics


def greedy_sequence(target: DenseModelRunner, prompt: Sequence[int], max_new_tokens: int,
                    eos: frozenset[int] = frozenset()) -> list[int]:
    """The target's plain greedy output after `prompt` (stopping at EOS, which is kept)."""
    seq = target.new_sequence(capacity=len(prompt) + max_new_tokens)
    logits = target.extend(seq, prompt)
    out: list[int] = []
    while len(out) < max_new_tokens:
        t = int(logits[-1].argmax())
        out.append(t)
        if t in eos:
            break
        logits = target.extend(seq, [t])
    return out


def agreement(draft: DenseModelRunner, prompt: Sequence[int], output: Sequence[int]) -> list[bool]:
    """agree[j] for each output token j: the draft's argmax after prompt + output[:j] is output[j]."""
    seq = list(prompt) + list(output)
    logits = draft.extend(draft.new_sequence(capacity=len(seq)), seq[:-1])
    pred = logits[len(prompt) - 1:].argmax(-1).tolist()
    return [int(p) == int(t) for p, t in zip(pred, output)]


def fixed_k_metrics(agree: Sequence[bool], k: int, metrics: Optional[SpecDecodeMetrics] = None,
                    start: int = 0) -> SpecDecodeMetrics:
    """The fixed-k loop's drafts and acceptances over an output whose first `start` tokens are
    already committed (the engine drafts from the second output token: start=1)."""
    m = metrics if metrics is not None else SpecDecodeMetrics()
    c, n = start, len(agree)
    while c < n:
        kk = min(k, n - c - 1)  # never draft past the output's end (the loop's budget rule)
        a = 0
        while a < kk and agree[c + a]:
            a += 1
        m.observe(kk, a)
        c += a + 1
    return m


def main(argv: Optional[list[str]] = None) -> int:
    from kvserve.bench.paths import shared_data_dir
    from kvserve.engine.tokenizer import load_tokenizer
    from kvserve.models.builtin import resolve_model
    from kvserve.spec_decode.measure import workload_prompts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="target: model dir, .gguf or built-in name (default: SmolLM2)")
    ap.add_argument("--drafts", nargs="+", required=True, help="draft model directories")
    ap.add_argument("--workload", default="edit", choices=["edit", "sharegpt"])
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path, _ = resolve_model(args.model)
    tok = load_tokenizer(path)
    eos = frozenset([tok.eos_token_id] if tok.eos_token_id is not None else [])
    target = DenseModelRunner.load(path, max_positions=4096)
    drafts = {d: DenseModelRunner.load(d, max_positions=4096) for d in args.drafts}
    metrics = {d: SpecDecodeMetrics() for d in args.drafts}
    for text in workload_prompts(args.workload, args.num_prompts, shared_data_dir()):
        prompt = [int(t) for t in tok.apply_chat_template([{"role": "user", "content": text}],
                                                          add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)]
        output = greedy_sequence(target, prompt, args.max_tokens, eos)
        for d, runner in drafts.items():
            fixed_k_metrics(agreement(runner, prompt, output), args.k, metrics[d], start=1)
    report: dict[str, Any] = {"model": str(path), "workload": args.workload, "k": args.k,
                              "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
                              "drafts": {d: m.as_dict() for d, m in metrics.items()}}
    for d, m in metrics.items():
        r = m.as_dict()
        print(f"{d}: acceptance {r['acceptance_rate']:.3f}, mean acceptance length "
              f"{r['mean_acceptance_length']:.2f}, per position "
              + ", ".join(f"{a:.2f}" for a in r["acceptance_rate_per_position"]), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
