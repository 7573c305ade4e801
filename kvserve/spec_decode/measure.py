"""Acceptance of each proposer on real prompts, through the reference loop (batch 1, greedy).

    python -m kvserve.spec_decode.measure --workload edit --num-prompts 6 --max-tokens 96
    python -m kvserve.spec_decode.measure --workload sharegpt --num-prompts 6 --max-tokens 96
    python -m kvserve.spec_decode.measure --proposer-cost

Workloads (prompts from the real ShareGPT file in shared/data, through the model's chat template):
  edit      "Rewrite this paragraph with one word changed: <a ShareGPT prompt of 300-1500 chars>"
            (the answer copies its input: the case n-gram and suffix lookup are for)
  sharegpt  the ShareGPT prompts themselves
Reports, per proposer: acceptance rate, mean acceptance length (tokens per speculating step),
target forward passes per generated token, and the loop's decode tokens per second of wall
time and of this process's CPU time (steps after the first, which holds the prefill) against no
speculation, methods interleaved per prompt.  With one torch thread, CPU time is the steadier
measure on a machine other jobs share.  Outputs are checked equal to non-speculative greedy decoding.  Engine speed
(batched, paged) is the integration's to measure; this shows what the proposers can give.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from kvserve.spec_decode import Proposer, make_proposer
from kvserve.spec_decode.adaptive import InterpolatedStepTime, SpecLengthPolicy
from kvserve.spec_decode.dense_runner import DenseModelRunner
from kvserve.spec_decode.metrics import SpecDecodeMetrics
from kvserve.spec_decode.reference import speculative_generate

SHAREGPT = "prompts/sharegpt/ShareGPT_V3_filtered_500.json"
EDIT = "Rewrite this paragraph with one word changed:\n\n{text}"


def workload_prompts(name: str, n: int, data_dir: Path) -> list[str]:
    rows = json.loads((data_dir / SHAREGPT).read_text())
    texts = [c["value"] for r in rows for c in r["conversations"][:1] if c.get("from") == "human"]
    if name == "edit":
        return [EDIT.format(text=t) for t in texts if 300 <= len(t) <= 1500][:n]
    if name == "sharegpt":
        return [t for t in texts if 20 <= len(t) <= 1500][:n]
    raise ValueError(f"unknown workload {name!r} (edit, sharegpt)")


@dataclass
class _Totals:
    metrics: SpecDecodeMetrics = field(default_factory=SpecDecodeMetrics)
    steps: int = 0
    tokens: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    decode_cpu_s: float = 0.0
    same: bool = True


def measure_step_time(target: DenseModelRunner, prompt: list[int], max_n: int, reps: int = 3) -> InterpolatedStepTime:
    """t(n) from this process's CPU time for steps of n = 1..max_n tokens after `prompt`."""
    seq = target.new_sequence(capacity=len(prompt) + max_n)
    target.extend(seq, prompt)
    samples = []
    for _ in range(reps):
        for n in range(1, max_n + 1):
            seq.truncate(len(prompt))
            t0 = time.process_time()
            target.extend(seq, prompt[-n:])
            samples.append((n, time.process_time() - t0))
    return InterpolatedStepTime.from_samples(samples)


def _proposer_and_policy(method: str, k: int, step_time: Optional[InterpolatedStepTime],
                         policies: dict[str, SpecLengthPolicy]) -> tuple[Optional[Proposer], Optional[SpecLengthPolicy]]:
    """"none", "ngram", "suffix", "draft:PATH", each optionally with "+adaptive"."""
    if method == "none":
        return None, None
    name, _, mode = method.partition("+")
    if mode not in ("", "adaptive"):
        raise ValueError(f"unknown mode {mode!r} in {method!r} (use NAME or NAME+adaptive)")
    policy = None
    if mode == "adaptive":
        assert step_time is not None
        # One policy per method across prompts: its overall acceptance rates carry over.
        policy = policies.setdefault(method, SpecLengthPolicy(k, step_time=step_time))
    return make_proposer(name), policy


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvserve.bench.paths import shared_data_dir
    from kvserve.engine.tokenizer import load_tokenizer
    from kvserve.models.builtin import resolve_model

    torch.set_num_threads(args.threads)
    path, _ = resolve_model(args.model)
    tok = load_tokenizer(path)
    target = DenseModelRunner.load(path, max_positions=4096)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    prompts = []
    for text in workload_prompts(args.workload, args.num_prompts, shared_data_dir()):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        prompts.append([int(t) for t in ids])
    methods = ["none"] + args.methods
    report: dict[str, Any] = {"model": str(path), "workload": args.workload, "num_prompts": len(prompts),
                              "max_tokens": args.max_tokens, "k": args.k, "methods": {}}
    step_time = None
    if any(m.endswith("+adaptive") for m in methods):
        step_time = measure_step_time(target, prompts[0], args.k + 1)
        report["step_time_cpu_s"] = [list(p) for p in step_time.points]
    policies: dict[str, SpecLengthPolicy] = {}
    acc = {m: _Totals() for m in methods}
    for p_idx, ids in enumerate(prompts):  # methods interleaved per prompt: a busy machine slows them alike
        baseline: list[int] = []
        for method in methods:
            proposer, policy = _proposer_and_policy(method, args.k, step_time, policies)
            res = speculative_generate(target, proposer, ids, args.max_tokens, num_spec_tokens=args.k,
                                       eos_token_ids=eos, policy=policy, request_id=f"p{p_idx}")
            a = acc[method]
            a.metrics.merge(res.metrics)
            a.steps += res.num_target_steps
            a.tokens += len(res.token_ids)
            a.decode_tokens += len(res.token_ids) - res.first_step_tokens
            a.decode_s += res.decode_s
            a.decode_cpu_s += res.decode_cpu_s
            if method == "none":
                baseline = res.token_ids
            else:
                a.same = a.same and res.token_ids == baseline
    for method, a in acc.items():
        report["methods"][method] = {
            "tokens": a.tokens, "target_steps": a.steps, "steps_per_token": a.steps / max(a.tokens, 1),
            "decode_s": a.decode_s,
            "decode_tokens_per_s": a.decode_tokens / a.decode_s if a.decode_s else 0.0,
            "decode_tokens_per_cpu_s": a.decode_tokens / a.decode_cpu_s if a.decode_cpu_s else 0.0,
            "same_as_greedy": a.same, **a.metrics.as_dict(),
        }
    base = report["methods"]["none"]
    for m in report["methods"].values():
        m["speedup"] = m["decode_tokens_per_s"] / base["decode_tokens_per_s"] if m["decode_s"] and base["decode_s"] else 0.0
        m["cpu_speedup"] = m["decode_tokens_per_cpu_s"] / base["decode_tokens_per_cpu_s"] if m["decode_s"] and base["decode_s"] else 0.0
    return report


def proposer_cost(tok: Any, data_dir: Path, prompt_tokens: int = 4000, appended: int = 4000) -> dict[str, Any]:
    """Time (best of 3) to index a prompt, per appended token and per proposal, on real text:
    ShareGPT prompts joined and tokenised with the model's tokenizer."""
    rows = json.loads((data_dir / SHAREGPT).read_text())
    text = " ".join(c["value"] for r in rows for c in r["conversations"][:1])
    ids = tok(text)["input_ids"][:prompt_tokens + appended]
    out: dict[str, Any] = {"tokens": len(ids)}
    for name in ("ngram", "suffix"):
        p = make_proposer(name)
        build = min(_timed(lambda: p.new_state(ids[:prompt_tokens])) for _ in range(3))
        per_append = float("inf")
        for _ in range(3):
            state = p.new_state(ids[:prompt_tokens])
            t0 = time.perf_counter()
            for i in range(prompt_tokens, len(ids)):
                state.append(ids[i:i + 1])
            per_append = min(per_append, (time.perf_counter() - t0) / max(len(ids) - prompt_tokens, 1))
        propose = min(_timed(lambda: [p.propose(state, 8) for _ in range(200)]) for _ in range(3)) / 200
        index = getattr(state, "index", None)
        out[name] = {"build_ms": build * 1e3, "append_us": per_append * 1e6, "propose_us": propose * 1e6,
                     "nodes_per_token": index.num_nodes / len(ids) if index is not None else None}
    return out


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir, .gguf or built-in name (default: smollm2-135m-instruct)")
    ap.add_argument("--workload", default="edit", choices=["edit", "sharegpt"])
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step (fixed)")
    ap.add_argument("--methods", nargs="+", default=["ngram", "suffix", "ngram+adaptive", "suffix+adaptive"],
                    help="ngram, suffix, draft:PATH; NAME+adaptive picks k per step with the goodput policy and the "
                         "step times measured at the start of the run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=None, help="also write the report as JSON here")
    ap.add_argument("--proposer-cost", action="store_true",
                    help="only time the n-gram and suffix proposers' indexing and proposals on real text")
    args = ap.parse_args(argv)
    if args.proposer_cost:
        from kvserve.bench.paths import shared_data_dir
        from kvserve.engine.tokenizer import load_tokenizer
        from kvserve.models.builtin import resolve_model

        cost = proposer_cost(load_tokenizer(resolve_model(args.model)[0]), shared_data_dir())
        print(json.dumps(cost, indent=1))
        return
    report = run(args)
    print(f"{report['workload']}: {report['num_prompts']} prompts, up to {report['max_tokens']} tokens, k={report['k']}")
    print(f"{'method':10} {'accept':>7} {'mean len':>8} {'steps/tok':>9} {'tok/s':>7} {'speedup':>7} "
          f"{'tok/cpu-s':>9} {'cpu speedup':>11}  same")
    for name, m in report["methods"].items():
        print(f"{name:10} {m['acceptance_rate']:7.3f} {m['mean_acceptance_length']:8.2f} {m['steps_per_token']:9.3f} "
              f"{m['decode_tokens_per_s']:7.2f} {m['speedup']:7.2f} {m['decode_tokens_per_cpu_s']:9.2f} "
              f"{m['cpu_speedup']:11.2f}  {m['same_as_greedy']}")
    if "step_time_cpu_s" in report:
        print("measured step time (CPU ms) by tokens: " +
              ", ".join(f"{n}: {t * 1e3:.0f}" for n, t in report["step_time_cpu_s"]))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
