#!/usr/bin/env python
"""Diagnostics behind docs/demo_model.md: where a trained demo model fails, and why.

Two probes, both with transformers (the reference implementation, not the engine):

* ``copy-by-length``: teacher-forced token accuracy of copy rows built to each length
  (`train_demo_model.make_row`).  A model that copies by a fixed distance back scores
  ~1.00 exactly at its training lengths and visibly less elsewhere.
* ``retrieval-misses``: greedy kv_retrieval on instances outside the eval seeds; for each
  miss, whether the key was miscopied from the question, the value was taken from another
  line, or the value is not in the context at all (a digit slip), and the asked key's depth.

    python scripts/demo_model_probe.py copy-by-length out/demo_v7 --lengths 256,272,1024,1088
    python scripts/demo_model_probe.py retrieval-misses out/demo_v6 --length 1024 --num 80 --format chat
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import train_demo_model as train  # noqa: E402

from kvserve.eval import tasks  # noqa: E402


def load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tok


@torch.no_grad()
def copy_accuracy_by_length(model, tok, lengths: list[int], rows: int, fmt: str = "plain") -> dict[int, list[float]]:
    """Length -> teacher-forced answer-token accuracy of `rows` copy rows built to that length."""
    out: dict[int, list[float]] = {}
    for length in lengths:
        accs = []
        for i in range(rows):
            row = train.make_row(tok, "copy", fmt, length, f"probe/copy/{i}", 1)
            ids, mask = torch.tensor([row.ids]), torch.tensor([row.targets])
            accs.append(float(train.answer_loss(model, ids, mask, tok.pad_token_id)[2][0]))
        out[length] = accs
    return out


def classify_miss(prompt: str, key: str, output: str) -> str:
    """Why a kv_retrieval answer is wrong: key_miscopied, other_line, or not_in_context."""
    lines = tasks.parse_lines(prompt)
    first = output.strip().split("\n")[0]
    said_key, _, value = first.partition(": ")
    if said_key != key:
        return "key_miscopied"
    return "other_line" if value in lines.values() else "not_in_context"


@torch.no_grad()
def retrieval_misses(model, tok, length: int, num: int, fmt: str) -> dict:
    counts = {"right": 0, "key_miscopied": 0, "other_line": 0, "not_in_context": 0}
    miss_depths = []
    for i in range(num):
        inst = tasks.make_instance("kv_retrieval", length, f"probe/kv/{i}", tok, fmt)
        ids = torch.tensor([inst.prompt_token_ids(tok)])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        output = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        if tasks.score(inst, output):
            counts["right"] += 1
            continue
        counts[classify_miss(inst.prompt, inst.metadata["key"], output)] += 1
        miss_depths.append(round(inst.metadata["depth"], 2))
    return {"counts": counts, "miss_depths": miss_depths}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="probe", required=True)
    c = sub.add_parser("copy-by-length")
    c.add_argument("model")
    c.add_argument("--lengths", default="200,240,256,272,300,512,544,1000,1024,1088")
    c.add_argument("--rows", type=int, default=6)
    c.add_argument("--format", default="plain", choices=tasks.FORMATS)
    r = sub.add_parser("retrieval-misses")
    r.add_argument("model")
    r.add_argument("--length", type=int, default=1024)
    r.add_argument("--num", type=int, default=80)
    r.add_argument("--format", default="plain", choices=tasks.FORMATS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load(args.model)
    if args.probe == "copy-by-length":
        lengths = [int(x) for x in args.lengths.split(",")]
        for length, accs in copy_accuracy_by_length(model, tok, lengths, args.rows, args.format).items():
            print(f"{length:5d}  mean {sum(accs) / len(accs):.3f}  rows {[round(a, 2) for a in accs]}")
    else:
        res = retrieval_misses(model, tok, args.length, args.num, args.format)
        print(f"{args.format} @{args.length}: {res['counts']}; depth of the asked key in each miss: {res['miss_depths']}")


if __name__ == "__main__":
    main()
