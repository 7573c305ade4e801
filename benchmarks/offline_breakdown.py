#!/usr/bin/env python
"""Wall-clock breakdown of one `kvserve bench offline` workload (W1, W2 or W3) in the engine:
linears by row count (prefill-sized > 64 rows, decode-sized <= 64), the attention backend's
parts (KV writes, decode kernel, prefill kernel), the LM head, and the whole step.

    chrt -f 50 python benchmarks/offline_breakdown.py [w1|w2|w3]   # kvserve.bench.offline.WORKLOADS

Same model (SmolLM2-135M architecture, random fp32 weights) and requests as the bench.  Timers
wrap the Python calls (`time.perf_counter`), so each line includes the call's own overhead, and
the timed run is ~3-5% slower than an untimed one.  Lines overlap: "attention forward" holds
its KV writes and kernels, "engine step" holds everything.
"""
from __future__ import annotations

import argparse
import collections
import tempfile
import time
from typing import Any, Callable

from kvserve.bench import offline
from kvserve.bench.offline import REFERENCE_CONFIG, WORKLOADS, parse_range
from kvserve.engine.engine_core import EngineCore
from kvserve.models import cpu_linear, llama
from kvserve.worker.attention import base, cpu_paged, torch_paged

seconds: dict[str, float] = collections.defaultdict(float)
calls: dict[str, int] = collections.defaultdict(int)


def _timed(fn: Callable[..., Any], key: Callable[..., str]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        k = key(*args, **kwargs)
        seconds[k] += time.perf_counter() - t0
        calls[k] += 1
        return out
    return wrapper


def _instrument() -> None:
    def linear_key(x: Any, *_: Any, **__: Any) -> str:
        return "linears, > 64 rows" if x.numel() // x.shape[-1] > 64 else "linears, <= 64 rows"

    cpu_linear.linear = _timed(cpu_linear.linear, linear_key)
    llama.LlamaForCausalLM.compute_logits = _timed(llama.LlamaForCausalLM.compute_logits, lambda *a: "LM head")
    cpu_paged.CpuPagedAttention._prefill = _timed(cpu_paged.CpuPagedAttention._prefill,
                                                   lambda *a: "attention: prefill kernel")
    cpu_paged.CpuPagedAttention._decode = _timed(cpu_paged.CpuPagedAttention._decode,
                                                  lambda *a: "attention: decode kernel")
    torch_paged.TorchPagedAttention.forward = _timed(torch_paged.TorchPagedAttention.forward,
                                                      lambda *a: "attention forward (all)")
    write = base.AttentionBackend.write_kv
    base.AttentionBackend.write_kv = staticmethod(_timed(write, lambda *a: "attention: KV writes"))  # type: ignore[method-assign]
    EngineCore.step = _timed(EngineCore.step, lambda *a: "engine step")  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", nargs="?", default="w1", choices=sorted(WORKLOADS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from kvserve import LLM, SamplingParams  # type: ignore[attr-defined]

    num, lengths, out_len = WORKLOADS[args.workload]  # the bench's own named workloads
    model_dir = offline.build_reference_model(tempfile.mkdtemp(prefix="kvserve-breakdown-"), seed=args.seed)
    reqs = offline.offline_workload(num, parse_range(lengths), out_len, REFERENCE_CONFIG["vocab_size"], args.seed)
    _instrument()
    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir))
    print(f"start-up {time.perf_counter() - t0:.2f} s")
    warm = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0)
    llm.generate([{"prompt_token_ids": reqs[0].prompt[:8]}], warm, use_tqdm=False)  # as the bench warms up
    seconds.clear()
    calls.clear()
    params = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0.0)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": r.prompt} for r in reqs], params, use_tqdm=False)
    print(f"{args.workload}: {time.perf_counter() - t0:.2f} s in all")
    for k in sorted(seconds, key=lambda k: -seconds[k]):
        print(f"  {k:28s} {seconds[k]:7.2f} s  {calls[k]:6d} calls")


if __name__ == "__main__":
    main()
