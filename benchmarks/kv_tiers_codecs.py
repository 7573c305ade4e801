#!/usr/bin/env python
"""Codecs through the engine: stored size, encode/decode speed, and next-token quality vs raw.

Per codec, one engine with a `cpu` tier using that codec ("finish" policy):
  1. serve PREFIX (--prefix-len tokens): its blocks are encoded into the tier when it finishes;
  2. drop the device prefix cache (so the prefix can only come from the tier);
  3. serve PREFIX + SUFFIX (--suffix-len tokens) teacher-forced with prompt logprobs: the
     prefix KV is decoded from the tier, and every suffix position attends to it.
The runner's `prompt_logprobs_hook` captures the *full* next-token log-distribution at each
suffix position.  Against the raw codec (bit-exact): top-1 agreement, KL(raw || codec) over the
whole vocabulary (mean and max over positions), and, for comparison, the KL computed from the
top-20 tokens only (renormalised), which is all `prompt_logprobs` could return.  A no-tier engine
computing everything gives the noise floor (raw tier vs recompute).

Size: stored bytes per block in the tier (bytes_written / puts) vs raw (the engine's fp32 KV)
and vs int8; speed: the tier's put (encode + store) and get (decode) time per block, as MB/s of
fp32 KV.

    python benchmarks/kv_tiers_codecs.py
    python benchmarks/kv_tiers_codecs.py --codecs raw,int8,cachegen --std 0.05   # sharper model
    python benchmarks/kv_tiers_codecs.py --demo      # the trained demo model on a retrieval prompt
    python benchmarks/kv_tiers_codecs.py --model smollm2-135m-instruct --sharegpt   # a real model, real text

With --demo the prompt is a held-out kv_retrieval instance of prefix + suffix tokens (the suffix
holds the last context lines, the question and the answer), so the codec sees a trained model's
KV on the text it was trained for: the ratio CacheGen's delta and entropy stages get there is
the one that matters, and the suffix's answer positions show whether the lookup survives.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from kv_tiers_common import SMOL135_SHAPE, build_llama

BLOCK = 16


def serve(engine: Any, ids: list[int], rid: str) -> Any:
    from kvserve import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=1)
    engine.add_request({"prompt_token_ids": ids}, sp, request_id=rid)
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out = o
    return out


def suffix_distributions(engine: Any, prefix: list[int], suffix: list[int], via_tier: bool) -> tuple[Any, dict]:
    """[len(suffix) - 1, vocab] log-probs at the suffix positions (each predicting the next suffix token)."""
    import torch

    rows: dict[int, torch.Tensor] = {}

    def hook(rid: str, start: int, lp: torch.Tensor) -> None:
        if rid == "q":
            for i in range(lp.shape[0]):
                rows[start + i] = lp[i].float().clone()

    engine.core.runner.prompt_logprobs_hook = hook
    info: dict = {}
    if via_tier:
        serve(engine, prefix, "p")
        assert engine.core.wait_for_kv_saves(300), "saves did not reach the tier"
        assert engine.core.reset_prefix_cache(), "blocks still in use"
    # No prompt_logprobs in the request (those never read cached KV): the hook sees every
    # computed prompt position anyway, here the suffix after the tier-loaded prefix.
    out = serve(engine, prefix + suffix, "q")
    info["cached_tokens"] = out.num_cached_tokens
    first, last = len(prefix), len(prefix) + len(suffix) - 1  # positions predicting suffix[1:]
    return torch.stack([rows[p] for p in range(first, last)]), info


def compare(ref: Any, lp: Any) -> dict:
    import torch

    p = ref.exp()
    kl = (p * (ref - lp)).sum(-1).clamp_min(0)
    top = ref.topk(20, dim=-1).indices
    r20 = ref.gather(-1, top)
    c20 = lp.gather(-1, top)
    r20 = r20 - torch.logsumexp(r20, -1, keepdim=True)
    c20 = c20 - torch.logsumexp(c20, -1, keepdim=True)
    kl20 = (r20.exp() * (r20 - c20)).sum(-1).clamp_min(0)
    return {"top1_agreement": float((ref.argmax(-1) == lp.argmax(-1)).float().mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "kl_top20_mean": float(kl20.mean())}


def demo_prompt(args: Any) -> tuple[list[int], list[int], int]:
    """(prefix, suffix, vocab size): a kv_retrieval instance with its answer, split after
    --prefix-len tokens (a multiple of the block size, so the whole prefix is tier-cacheable)."""
    from transformers import AutoTokenizer

    from kvserve.engine.llm_engine import DEFAULT_MODEL_DIR
    from kvserve.eval import tasks

    args.model = args.model or str(DEFAULT_MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(args.model)
    inst = tasks.make_instance("kv_retrieval", args.prefix_len + args.suffix_len, f"codecs/{args.seed}", tok, "plain")
    ids = inst.prompt_token_ids(tok) + tok(inst.answer, add_special_tokens=False)["input_ids"]
    if len(ids) <= args.prefix_len + 1:
        raise SystemExit(f"the instance has only {len(ids)} tokens; lower --prefix-len")
    return ids[: args.prefix_len], ids[args.prefix_len:], len(tok)


def sharegpt_prompt(args: Any) -> tuple[list[int], list[int], int]:
    """(prefix, suffix, vocab size): ShareGPT first turns as the user turns of one conversation
    through the model's chat template, cut into --prefix-len + --suffix-len tokens (real text: the
    token-to-token locality CacheGen's delta stage relies on)."""
    from kvserve.engine.tokenizer import load_tokenizer
    from kvserve.eval.real_prompts import load_prompts
    from kvserve.models.builtin import resolve_model

    args.model = str(resolve_model(args.model)[0])
    tok = load_tokenizer(args.model)
    texts = load_prompts("/work/shared/data/prompts/sharegpt/ShareGPT_V3_filtered_500.json")
    need = args.prefix_len + args.suffix_len
    ids: list[int] = []
    for n in range(8, len(texts) + 8, 8):
        msgs = [{"role": "user", "content": t} for t in texts[:n]]
        ids = tok.encode(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)
        if len(ids) >= need:
            break
    return ids[:args.prefix_len], ids[args.prefix_len:need], len(tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: /tmp/smol135 (std 0.02) or a built sharper one")
    ap.add_argument("--std", type=float, default=None, help="build a SmolLM2-135M-shaped model with this init std")
    ap.add_argument("--demo", action="store_true", help="the built-in demo model on a kv_retrieval prompt")
    ap.add_argument("--sharegpt", action="store_true",
                    help="--model (a directory, .gguf or built-in name) on ShareGPT text through its chat template")
    ap.add_argument("--codecs", default="raw,int8,fp8,cachegen,cachegen-b888,cachegen-b654")
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from kvserve.engine.llm_engine import LLMEngine

    if args.demo:
        prefix, suffix, vocab = demo_prompt(args)
    elif args.sharegpt:
        prefix, suffix, vocab = sharegpt_prompt(args)
    else:
        if args.model is None:
            args.model = "/tmp/smol135" if args.std is None else f"/tmp/kvserve-bench/smol135-std{args.std}"
        build_llama(Path(args.model), SMOL135_SHAPE, std=args.std)
        rng = random.Random(args.seed)
        vocab = SMOL135_SHAPE["vocab_size"]
        prefix = [rng.randrange(100, vocab) for _ in range(args.prefix_len)]
        suffix = [rng.randrange(100, vocab) for _ in range(args.suffix_len)]
    kw = dict(block_size=BLOCK, max_num_batched_tokens=2048, kv_cache_memory=1 << 30, max_model_len=4096)

    plain = LLMEngine(args.model, **kw)
    recompute, _ = suffix_distributions(plain, prefix, suffix, via_tier=False)
    plain.close()
    entropy = float(-(recompute.exp() * recompute).sum(-1).mean())
    print(f"model {args.model}: mean next-token entropy at the suffix positions {entropy:.2f} nats "
          f"(uniform would be {torch.log(torch.tensor(float(vocab))):.2f})", flush=True)

    results: dict[str, dict] = {}
    dists: dict[str, Any] = {}
    for codec in args.codecs.split(","):
        engine = LLMEngine(args.model, kv_tiers="cpu:4GiB", kv_codec=codec, kv_offload_policy="finish", **kw)
        try:
            lp, info = suffix_distributions(engine, prefix, suffix, via_tier=True)
            st = engine.kv_tier_stats()["tiers"]["0:cpu"]
            raw_block = engine.core.kv_tiers.namespace.block_nbytes
        finally:
            engine.close()
        assert info["cached_tokens"] == args.prefix_len, f"{codec}: prefix not served from the tier: {info}"
        dists[codec] = lp
        per_block = st["bytes_written"] / max(1, st["puts"])
        results[codec] = {"bytes_per_block": per_block, "ratio_vs_raw_fp32": raw_block / per_block,
                          "encode_MBps": raw_block * st["puts"] / max(1e-9, st["put_latency_s"]) / 1e6,
                          "decode_MBps": raw_block * st["gets"] / max(1e-9, st["get_latency_s"]) / 1e6}
        print(f"  {codec}: {per_block / 1024:.1f} KiB/block", flush=True)
    ref = dists.get("raw")
    for codec, r in results.items():
        if ref is not None:
            r.update(compare(ref, dists[codec]))
        if "int8" in results:
            r["ratio_vs_int8"] = results["int8"]["bytes_per_block"] / r["bytes_per_block"]
    floor = compare(recompute, ref) if ref is not None else {}
    print()
    print(f"noise floor (raw tier vs recompute, no tier): {floor}")
    print()
    print("| codec | KiB/block | vs raw fp32 | vs int8 | encode MB/s | decode MB/s | top-1 agree | KL mean | KL max "
          "| KL top-20 only |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for codec, r in results.items():
        print(f"| {codec} | {r['bytes_per_block'] / 1024:.1f} | {r['ratio_vs_raw_fp32']:.2f}x | "
              f"{r.get('ratio_vs_int8', float('nan')):.2f}x | {r['encode_MBps']:.0f} | {r['decode_MBps']:.0f} | "
              f"{100 * r.get('top1_agreement', float('nan')):.1f}% | {r.get('kl_mean', float('nan')):.2e} | "
              f"{r.get('kl_max', float('nan')):.2e} | {r.get('kl_top20_mean', float('nan')):.2e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "entropy_nats": entropy, "noise_floor": floor,
                                               "codecs": results}, indent=1))


if __name__ == "__main__":
    main()
