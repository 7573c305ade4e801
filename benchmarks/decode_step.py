"""Median decode-step time of the engine on a built-in model, warm, for the CPU kernel switches.

    chrt -f 50 python benchmarks/decode_step.py --batch 1 --output 128 [--profile]
    KVSERVE_CPU_FUSED=0 chrt -f 50 python benchmarks/decode_step.py ...     # torch layer ops
    KVSERVE_CPU_LINEAR=onednn chrt -f 50 python benchmarks/decode_step.py   # oneDNN linears

`--batch` requests of 128 prompt tokens each, greedy, `--output` tokens each; prints the median of 3
generate calls divided by the output length (so the prefill is included, amortised).  Timings are only
meaningful on an otherwise idle machine or under `chrt -f`.
"""
from __future__ import annotations

import argparse
import time

from kvserve import SamplingParams
from kvserve.engine.llm import LLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's op table for one run")
    args = p.parse_args()
    llm = LLM(model=args.model, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": list(range(100 + i, 228 + i))} for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.output, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up (kernels built, pages touched)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    med = sorted(times)[1]
    print(f"batch {args.batch}, {args.output} out: median {med:.3f} s, {med / args.output * 1000:.1f} ms/step")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.generate(prompts, params, use_tqdm=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    llm.close()


if __name__ == "__main__":
    main()
