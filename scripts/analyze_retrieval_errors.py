#!/usr/bin/env python
"""Where do a model's wrong key-value retrieval answers come from?

For held-out `kv_retrieval` instances, generate greedily with kvserve and classify every wrong
answer: the value it wrote belongs to another line of the context (a *lookup* error: the model
attended to the wrong line) or to no line (a *copy* error).  For lookup errors, count how many
key letters (same position) the wrongly chosen line shares with the queried key: a model that
matches keys on one or two letters instead of all four shows up as a peak at 1-2.

    python scripts/analyze_retrieval_errors.py --model kvserve/demo_model --lengths 256,512 --n 100
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvserve import LLM, SamplingParams  # noqa: E402
from kvserve.eval import tasks  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the demo model)")
    p.add_argument("--lengths", default="256,512,1024")
    p.add_argument("--n", type=int, default=100, help="instances per length")
    p.add_argument("--seed", type=int, default=4321)
    args = p.parse_args()
    llm = LLM(args.model)
    tok = llm.get_tokenizer()
    for length in [int(x) for x in args.lengths.split(",")]:
        suite = tasks.generate_suite(["kv_retrieval"], [length], args.n, args.seed, tok, ["plain"])
        outs = llm.generate([{"prompt_token_ids": i.prompt_token_ids(tok)} for i in suite],
                            SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
        kinds: collections.Counter[str] = collections.Counter()
        shared: collections.Counter[int] = collections.Counter()
        for inst, out in zip(suite, outs):
            text = out.outputs[0].text.strip()
            if tasks.score(inst, text):
                kinds["correct"] += 1
                continue
            table = tasks.parse_lines(inst.prompt)
            key = inst.metadata["key"]
            m = re.fullmatch(r"([A-Z]{4}): (\d+)", text)
            if not m or m.group(1) != key:
                kinds["wrong key echoed / malformed"] += 1
                continue
            owners = [k for k, v in table.items() if v == m.group(2) and k != key]
            if not owners:
                kinds["value from no line (copy error)"] += 1
                continue
            kinds["value of another line (lookup error)"] += 1
            shared[max(sum(a == b for a, b in zip(k, key)) for k in owners)] += 1
        lines = len(tasks.parse_lines(suite[0].prompt))
        print(f"length {length} (~{lines} lines): " + ", ".join(f"{k} {v}" for k, v in kinds.most_common()))
        if shared:
            print("  lookup errors by key letters shared with the queried key (same position): "
                  + ", ".join(f"{k}: {shared[k]}" for k in sorted(shared)))
            # Chance level: a uniformly random other line shares 0..3 letters ~Binomial(4, 1/26).


if __name__ == "__main__":
    main()
