"""One exit trial, run as a subprocess by test_exit.py (not a test module itself).

    python exit_trial.py MODEL TIERS --read SEED --write SEED [--tokens N] [--block-size B] [--policy P] [--end HOW]

Builds an offline LLM on the tiers, generates the prompt seeded `--read` (printing
`cached <n>`: its prompt tokens served from the KV cache), then the prompt seeded
`--write`, and ends the way `--end` says: "exit" (the script just ends, nothing
closed), "del" (`del llm`, then the script ends) or "with" (the LLM was used as a
context manager).  The caller checks the exit status and stderr for aborts.
"""
from __future__ import annotations

import argparse
import random

from kvserve import LLM, SamplingParams


def prompt(seed: int, n: int) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(512) for _ in range(n)]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("tiers")
    p.add_argument("--read", type=int, default=None)
    p.add_argument("--write", type=int, default=None)
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--policy", default=None)
    p.add_argument("--end", choices=["exit", "del", "with"], default="exit")
    args = p.parse_args()
    kwargs = {} if args.policy is None else {"kv_offload_policy": args.policy}
    sp = SamplingParams(max_tokens=1, temperature=0)
    llm = LLM(model=args.model, kv_tiers=args.tiers, block_size=args.block_size, max_model_len=1024, **kwargs)

    def run() -> None:
        if args.read is not None:
            out = llm.generate(prompt(args.read, args.tokens), sp, use_tqdm=False)[0]
            print(f"cached {out.metrics.num_cached_tokens}", flush=True)
        if args.write is not None:
            llm.generate(prompt(args.write, args.tokens), sp, use_tqdm=False)

    if args.end == "with":
        with llm:
            run()
    else:
        run()
        if args.end == "del":
            del llm


if __name__ == "__main__":
    main()
