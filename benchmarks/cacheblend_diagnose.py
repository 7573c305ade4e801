"""CacheBlend selection study: a dense re-implementation of blending, to compare selection rules.

Outside the engine (plain tensors, one prompt at a time, the model's own layers), so that
many selection rules can be tried on the same instances quickly.  Per instance of an eval
task cut into [header, documents, question] (kvserve/blend/eval_segments.py):

- full prefill of the concatenated tokens: per-layer K/V and the greedy answer (reference);
- each document computed alone after a sink (`--sink bos`: the prompt's first token, as
  the engine does; `header`: the whole first segment), keys re-rotated to the document's
  place in the prompt;
- blending as kvserve/blend/forward.py does it (layers before the check layer on every
  token, then the selected tokens only), for each rule and ratio, then greedy decoding;
- reported: exact match of the answer,
  mean KL and top-1 agreement teacher-forced along full prefill's greedy answer, and
  (rule `oracle`) what choosing by the *true* deviation from full-prefill K/V gives.

Rules: `kv` (squared K+V distance at the check layer, the engine's), `v` (values only),
`k` (keys only), `oracle` (distance to the full prefill's K/V summed over every layer),
`random`, `first` (the first tokens of each document), `kv+first` (always the first
`--first` tokens of each document, the rest by `kv`), `gradual` (CacheBlend's gradual
filtering: 2x ratio at the check layer, re-ranked by `kv` on the next layer down to the
ratio).  Accuracy only, no timing.

    python benchmarks/cacheblend_diagnose.py --model kvserve-demo --length 1024 --docs 6 --num 16
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from kvserve.blend.eval_segments import SegmentedPrompt, split_instance
from kvserve.eval import tasks
from kvserve.models.rope import apply_rope, rerotate_keys

RULES = ("kv", "v", "k", "oracle", "random", "first", "kv+first", "gradual")


@dataclass
class KV:
    k: list[torch.Tensor]  # per layer [T, KVH, D], rotated at the positions it belongs to
    v: list[torch.Tensor]


def _qkv(attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    T = x.shape[0]
    q, k, v = attn.qkv_proj(x).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q = q.view(T, attn.num_heads, attn.head_dim)
    k = k.view(T, attn.num_kv_heads, attn.head_dim)
    v = v.view(T, attn.num_kv_heads, attn.head_dim)
    if attn.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _attend(attn: Any, q, keys, values, qpos: torch.Tensor) -> torch.Tensor:
    E = keys.shape[0]
    mask = torch.arange(E)[None, :] <= qpos[:, None]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, scale=attn.head_dim ** -0.5, enable_gqa=attn.num_heads != attn.num_kv_heads,
    ).squeeze(0).transpose(0, 1)
    return attn.o_proj(o.reshape(q.shape[0], attn.q_size))


@torch.no_grad()
def prefill(model: Any, ids: list[int], start: int = 0, past: Optional[KV] = None) -> tuple[torch.Tensor, KV]:
    """Causal forward of `ids` at positions start.. after `past` (K/V of [0, start)); the final
    normed hidden state of every token and the K/V of [0, start + len(ids))."""
    pos = torch.arange(start, start + len(ids))
    h = model.embed_tokens(torch.tensor(ids))
    cos, sin = model.rotary.cos_sin(pos, h.dtype)
    out = KV([], [])
    for li, layer in enumerate(model.layers):
        attn = layer.self_attn
        q, k, v = _qkv(attn, layer.input_layernorm(h), cos, sin)
        if past is not None:
            k, v = torch.cat([past.k[li], k]), torch.cat([past.v[li], v])
        out.k.append(k)
        out.v.append(v)
        h = h + _attend(attn, q, k, v, pos)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.norm(h), out


@torch.no_grad()
def blend(model: Any, ids: list[int], placed: KV, reused: torch.Tensor, rule: str, ratio: float, check: int,
          full: KV, first: int, doc_starts: list[int], gen: torch.Generator) -> tuple[torch.Tensor, KV]:
    """kvserve/blend/forward.py's blend over the whole prompt (the header is recomputed: it
    equals a prefix-cache hit).  Returns the last token's normed hidden state and the K/V."""
    N = len(ids)
    pos = torch.arange(N)
    h = model.embed_tokens(torch.tensor(ids))
    cos, sin = model.rotary.cos_sin(pos, h.dtype)
    K, V = [k.clone() for k in placed.k], [v.clone() for v in placed.v]
    n_reused = int(reused.sum())
    n_sel = min(n_reused, math.ceil(ratio * n_reused - 1e-9))
    idx: Optional[torch.Tensor] = None
    for li, layer in enumerate(model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = _qkv(attn, x, cos, sin)
        cur = torch.arange(N) if idx is None else idx
        if idx is None and li >= check and n_sel < n_reused:
            idx = _choose(rule, k, v, K[li], V[li], reused, n_sel, full, placed, first, doc_starts, gen, li)
            if rule == "gradual":  # keep twice as many here; cut down at the next layer
                idx = _choose("kv", k, v, K[li], V[li], reused, min(n_reused, 2 * n_sel), full, placed, first,
                              doc_starts, gen, li)
                pending_cut = True
            else:
                pending_cut = False
            sub = torch.searchsorted(cur, idx)
            h, cos, sin, q, k, v, cur = h[sub], cos[sub], sin[sub], q[sub], k[sub], v[sub], idx
        elif idx is not None and rule == "gradual" and pending_cut:
            # Re-rank the kept chunk tokens by their deviation at this layer.
            keep_r = reused[cur]
            dev = _dev("kv", k[keep_r], v[keep_r], K[li][cur[keep_r]], V[li][cur[keep_r]])
            top = cur[keep_r][dev.topk(n_sel).indices]
            chosen = ~reused
            chosen[top] = True
            idx = chosen.nonzero().squeeze(1)
            sub = torch.searchsorted(cur, idx)
            h, cos, sin, q, k, v, cur = h[sub], cos[sub], sin[sub], q[sub], k[sub], v[sub], idx
            pending_cut = False
        K[li][cur], V[li][cur] = k, v
        h = h + _attend(attn, q, K[li], V[li], cur)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.norm(h[-1:]), KV(K, V)


def _dev(kind: str, k, v, k_old, v_old) -> torch.Tensor:
    dk = ((k.float() - k_old.float()) ** 2).sum((1, 2))
    dv = ((v.float() - v_old.float()) ** 2).sum((1, 2))
    return {"kv": dk + dv, "k": dk, "v": dv}[kind]


def _choose(rule, k, v, k_old, v_old, reused, n_sel, full: KV, placed: KV, first, doc_starts, gen, li):
    chosen = ~reused
    placed_idx = reused.nonzero().squeeze(1)
    if n_sel > 0:
        if rule in ("kv", "k", "v", "gradual"):
            score = _dev("kv" if rule == "gradual" else rule, k[placed_idx], v[placed_idx], k_old[placed_idx],
                         v_old[placed_idx])
        elif rule == "oracle":
            score = sum(_dev("kv", full.k[j][placed_idx], full.v[j][placed_idx], placed.k[j][placed_idx],
                             placed.v[j][placed_idx]) / (full.v[j][placed_idx].float() ** 2).sum().clamp_min(1e-9)
                        for j in range(len(full.k)))
        elif rule == "random":
            score = torch.rand(len(placed_idx), generator=gen)
        elif rule in ("first", "kv+first"):
            starts = torch.tensor(doc_starts)
            # distance from the start of the token's document
            d = placed_idx[:, None] - starts[None, :]
            d = torch.where(d >= 0, d, torch.iinfo(torch.long).max).min(1).values
            if rule == "first":
                score = -d.float()
            else:
                score = _dev("kv", k[placed_idx], v[placed_idx], k_old[placed_idx], v_old[placed_idx])
                score = torch.where(d < first, torch.full_like(score, float("inf")), score)
        else:
            raise ValueError(rule)
        chosen[placed_idx[score.topk(n_sel).indices]] = True
    return chosen.nonzero().squeeze(1)


@torch.no_grad()
def decode(model: Any, h_last: torch.Tensor, kv: KV, n: int, max_new: int, eos: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation from the prompt's last hidden state; tokens and the first logprobs."""
    first_lp = model.compute_logits(h_last).log_softmax(-1)[0]
    toks: list[int] = []
    nxt = int(first_lp.argmax())
    pos = n
    while len(toks) < max_new and nxt != eos:
        toks.append(nxt)
        h, kv = prefill(model, [nxt], pos, kv)
        pos += 1
        nxt = int(model.compute_logits(h[-1:]).argmax())
    return toks, first_lp


@torch.no_grad()
def teacher(model: Any, h_last: torch.Tensor, kv: KV, n: int, toks: list[int]) -> torch.Tensor:
    """[len(toks), vocab] log-softmax rows predicting `toks` after the prompt (teacher forced)."""
    rows = [h_last]
    if len(toks) > 1:
        h, _ = prefill(model, toks[:-1], n, kv)
        rows.append(h)
    return model.compute_logits(torch.cat(rows)).log_softmax(-1)


def chunk_kv(model: Any, seg: SegmentedPrompt, sink_kind: str) -> tuple[KV, torch.Tensor, list[int]]:
    """K/V of the whole prompt as blending places it: the header exact, each document computed
    alone after its sink and re-rotated to its position, the question zero (recomputed)."""
    flat = seg.flat()
    sink = flat[:1] if sink_kind == "bos" else seg.seg0
    _, hdr = prefill(model, seg.seg0)
    K = [k.clone() for k in hdr.k]
    V = [v.clone() for v in hdr.v]
    reused = torch.zeros(len(flat), dtype=torch.bool)
    starts = []
    p = len(seg.seg0)
    for d in seg.docs:
        _, kv = prefill(model, [*sink, *d])
        delta = torch.full((len(d),), p - len(sink))
        for li in range(len(K)):
            K[li] = torch.cat([K[li], rerotate_keys(kv.k[li][len(sink):], delta, model.rotary.inv_freq)])
            V[li] = torch.cat([V[li], kv.v[li][len(sink):]])
        reused[p:p + len(d)] = True
        starts.append(p)
        p += len(d)
    for li in range(len(K)):
        z = torch.zeros((len(seg.question),) + K[li].shape[1:], dtype=K[li].dtype)
        K[li], V[li] = torch.cat([K[li], z]), torch.cat([V[li], z.clone()])
    return KV(K, V), reused, starts


def main(argv: list[str] | None = None) -> None:
    from kvserve import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="kvserve-demo")
    ap.add_argument("--task", default="kv_retrieval", choices=tasks.TASK_NAMES)
    ap.add_argument("--format", default="plain", choices=tasks.FORMATS)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--ratios", default="0,0.15,0.3")
    ap.add_argument("--rules", default="kv,v,oracle,random")
    ap.add_argument("--check-layers", default="1")
    ap.add_argument("--sinks", default="bos", help="bos,header")
    ap.add_argument("--first", type=int, default=4, help="kv+first: always recompute this many per document")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    llm = LLM(args.model, dtype="float32", attention_backend="torch", enable_prefix_caching=False,
              num_kv_blocks=16)
    model: Any = llm.engine.core.runner.model  # type: ignore[attr-defined]
    tok = llm.get_tokenizer()
    eos = tok.eos_token_id
    suite = tasks.generate_suite([args.task], [args.length], args.num, args.seed, tok, [args.format])
    ratios = [float(r) for r in args.ratios.split(",")]
    configs = [(s, c, rule, r) for s in args.sinks.split(",") for c in map(int, args.check_layers.split(","))
               for rule in args.rules.split(",") for r in ratios
               if r not in (0.0, 1.0) or rule == args.rules.split(",")[0]]  # 0 and 1.0 do not depend on the rule
    em: dict[Any, int] = {"full": 0}
    kl: dict[Any, float] = {}
    top1: dict[Any, float] = {}
    for i, inst in enumerate(suite):
        seg = split_instance(inst, tok, args.docs)
        flat = seg.flat()
        max_new = len(tok(inst.answer, add_special_tokens=False)["input_ids"]) + 4
        hs, full = prefill(model, flat)
        ref_toks, _ = decode(model, hs[-1:], full, len(flat), max_new, eos)
        ref_lp = teacher(model, hs[-1:], full, len(flat), ref_toks).double()
        em["full"] += tasks.score(inst, tok.decode(ref_toks))
        placed_by_sink = {s: chunk_kv(model, seg, s) for s in args.sinks.split(",")}
        gen = torch.Generator().manual_seed(i)
        for cfg in configs:
            s, c, rule, r = cfg
            placed, reused, starts = placed_by_sink[s]
            h, kv = blend(model, flat, placed, reused, rule, r, c, full, args.first, starts, gen)
            toks, _ = decode(model, h, kv, len(flat), max_new, eos)
            em[cfg] = em.get(cfg, 0) + tasks.score(inst, tok.decode(toks))
            lp = teacher(model, h, kv, len(flat), ref_toks).double()
            kl[cfg] = kl.get(cfg, 0.0) + float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean())
            top1[cfg] = top1.get(cfg, 0) + float((lp.argmax(-1) == ref_lp.argmax(-1)).double().mean())
        print(f"{i + 1}/{len(suite)} full={em['full']} " +
              " ".join(f"{'/'.join(map(str, k))}={v}" for k, v in em.items() if k != "full"), file=sys.stderr)
    n = len(suite)
    print(f"{args.model} {args.task}/{args.format}/{args.length}, {args.docs} docs, {n} instances; "
          f"full prefill exact match {em['full'] / n:.3f}")
    print("| sink | check layer | rule | ratio | exact match | KL (teacher-forced on full prefill's answer) | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for cfg in configs:
        s, c, rule, r = cfg
        print(f"| {s} | {c} | {rule if 0 < r < 1 else '(naive)' if r == 0 else '(full)'} | {r} | {em[cfg] / n:.3f} | {kl[cfg] / n:.4f} | "
              f"{top1[cfg] / n:.3f} |")
    llm.close()


if __name__ == "__main__":
    main()
