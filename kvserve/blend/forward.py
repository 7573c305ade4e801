"""The runner side of blending: compute missing chunks, place chunks, select, recompute.

For a request whose step carries a BlendStep (kvserve/blend/spec.py), with the prefix
cache supplying positions [0, S) and the step running [S, E):

1. chunks not cached are computed alone after their sink (the prompt's first segment,
   chunk_source.py; positions 0 .. len(sink) + L - 1) into their chunk blocks, as an
   ordinary prefill of a sequence of their own;
2. every chunk's K/V is copied from its chunk blocks to the request's slots at its
   prompt positions, keys re-rotated by the position shift (models/rope.py; RoPE
   composes additively, so this equals computing the keys there);
3. the layers before `check_layer` run on every token [S, E) as in a prefill;
4. at `check_layer` the K/V of every token are computed and compared with the placed
   K/V; the `ratio` of chunk tokens that deviate most (CacheBlend's selection), plus
   every token outside a chunk (the question, a segment after a partial prefix hit),
   are recomputed from here on; the others keep the placed K/V;
5. the last layers run on the selected tokens only, each attending by explicit
   position to the whole context [0, E) in the request's blocks.

When every token is selected (ratio 1.0, or nothing was placed) step 3 covers all
layers, with the very calls an ordinary prefill makes, so the result is the full
recompute's, bit for bit (tests/unit/blend/test_blend_engine.py holds them equal).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from kvserve.blend.spec import BlendStep, ChunkPlacement, num_selected
from kvserve.models.rope import apply_rope, rerotate_keys
from kvserve.protocol import (
    AttentionMetadata, ForwardContext, ModelRunnerOutput, PrefillSeq, SampledToken, ScheduledRequest, SchedulerOutput,
)

if TYPE_CHECKING:
    from kvserve.worker.model_runner import ModelRunner


def execute_with_blend(runner: ModelRunner, sched: SchedulerOutput) -> ModelRunnerOutput:
    """Run a step holding blend requests (block tables and KV transfers already applied).

    Requests run in step order (a later request may share blocks an earlier one writes in
    this step): runs of ordinary requests as one batch each, blend requests one by one."""
    out = ModelRunnerOutput()
    done: set[int] = set()
    for r in sched.requests:
        for c in r.blend.chunks if r.blend is not None else ():
            if c.compute and c.src_block_ids[0] not in done:  # a chunk two requests miss: once
                done.add(c.src_block_ids[0])
                compute_chunk(runner, c)
    run: list[ScheduledRequest] = []
    for r in [*sched.requests, None]:
        if r is not None and r.blend is None:
            run.append(r)
            continue
        if run:
            # The tables are applied already: resend them whole (set() is idempotent).
            sub = [dataclasses.replace(x, block_ids=runner.block_tables.ids(x.request_id), full_table=True)
                   for x in run]
            _merge(out, runner.execute(SchedulerOutput(requests=sub)))
            run = []
        if r is not None:
            _blend_one(runner, r, out)
    return out


def _merge(out: ModelRunnerOutput, part: ModelRunnerOutput) -> None:
    out.sampled.update(part.sampled)
    out.prompt_logprobs.update(part.prompt_logprobs)
    out.num_accepted.update(part.num_accepted)


def _slots(block_ids: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_ids[positions // block_size] * block_size + positions % block_size


def _prefill_meta(slots: torch.Tensor, n: int, start: int, blocks: torch.Tensor, bs: int) -> AttentionMetadata:
    return AttentionMetadata(slot_mapping=slots, num_decode_tokens=0, decode_block_tables=None,
                             decode_seq_lens=None, decode_mask=None, prefills=[PrefillSeq(0, n, start, blocks)],
                             block_size=bs)


def compute_chunk(runner: ModelRunner, c: ChunkPlacement) -> None:
    """The chunk's KV computed after its sink alone (positions 0 .. len(sink) + length - 1)
    into its chunk blocks."""
    dev, bs = runner.device, runner.block_size
    n = len(c.sink) + c.length
    ids = torch.tensor([*c.sink, *c.token_ids], dtype=torch.long, device=dev)
    pos = torch.arange(n, dtype=torch.long, device=dev)
    blocks = torch.tensor(c.src_block_ids, dtype=torch.long, device=dev)
    meta = _prefill_meta(_slots(blocks, pos, bs), n, 0, blocks, bs)
    runner.model(ids, pos, ForwardContext(runner.backend, runner.kv_caches, meta))


def place_chunk(kv_caches: list[torch.Tensor], c: ChunkPlacement, dst_slots: torch.Tensor,
                inv_freq: torch.Tensor, block_size: int) -> None:
    """Copy a chunk's K/V (every layer) to `dst_slots`, keys moved from their positions in the
    chunk blocks (len(sink) ..) to dst_start .."""
    dev = dst_slots.device
    first = len(c.sink)
    src = _slots(torch.tensor(c.src_block_ids, dtype=torch.long, device=dev),
                 torch.arange(first, first + c.length, dtype=torch.long, device=dev), block_size)
    delta = torch.full((c.length,), c.dst_start - first, dtype=torch.long, device=dev)
    for cache in kv_caches:
        _, nb, bs, kvh, d = cache.shape
        k, v = cache[0].view(nb * bs, kvh, d), cache[1].view(nb * bs, kvh, d)
        k.index_copy_(0, dst_slots, rerotate_keys(k.index_select(0, src), delta, inv_freq))
        v.index_copy_(0, dst_slots, v.index_select(0, src))


def _blend_one(runner: ModelRunner, r: ScheduledRequest, out: ModelRunnerOutput) -> None:
    assert r.blend is not None
    h = blend_forward(runner, r, r.blend)  # [1, hidden], normed, at the last position
    if not r.sample:
        return
    logits = runner.model.compute_logits(h)
    if runner.sample_logprobs_hook is not None:
        runner.sample_logprobs_hook([r.request_id], logits.float().log_softmax(-1))
    result = runner.sampler(logits, [runner._sampling_row(r)])
    out.sampled[r.request_id] = [SampledToken(result.token_ids[0], result.logprobs[0])]


def blend_forward(runner: ModelRunner, r: ScheduledRequest, blend: BlendStep) -> torch.Tensor:
    """Steps 2-5 of the module doc for one request; returns the final (normed) hidden
    state of its last position, [1, hidden]."""
    model, dev, bs = runner.model, runner.device, runner.block_size
    S, N = r.start_pos, len(r.token_ids)
    E = S + N
    table = torch.tensor(runner.block_tables.ids(r.request_id), dtype=torch.long, device=dev)[:-(-E // bs)]
    pos = torch.arange(S, E, dtype=torch.long, device=dev)
    slots = _slots(table, pos, bs)
    reused = torch.zeros(N, dtype=torch.bool, device=dev)
    for c in blend.chunks:
        lo = c.dst_start - S
        place_chunk(runner.kv_caches, c, slots[lo:lo + c.length], model.rotary.inv_freq, bs)
        reused[lo:lo + c.length] = True
    num_reused = int(reused.sum())
    n_sel = num_selected(blend.ratio, num_reused)
    check = min(blend.check_layer, len(model.layers) - 1)
    ctx_all = ForwardContext(runner.backend, runner.kv_caches, _prefill_meta(slots, N, S, table, bs))
    h = model.embed_tokens(torch.tensor(r.token_ids, dtype=torch.long, device=dev))
    cos, sin = model.rotary.cos_sin(pos, h.dtype)
    idx: Optional[torch.Tensor] = None  # the recomputed tokens (indices into [S, E)), once selected
    for li, layer in enumerate(model.layers):
        if idx is None and (n_sel == num_reused or li < check):
            h = layer(h, cos, sin, ctx_all)  # every token, as an ordinary prefill
            continue
        cache = runner.kv_caches[li]
        x = layer.input_layernorm(h)
        q, k, v = _qkv(layer.self_attn, x, cos, sin)
        if idx is None:  # the check layer: choose by K/V deviation from the placed chunks
            idx = _select(cache, slots, k, v, reused, n_sel)
            h, pos, slots, cos, sin = h[idx], pos[idx], slots[idx], cos[idx], sin[idx]
            q, k, v = q[idx], k[idx], v[idx]
        h = h + _attend(runner, layer.self_attn, q, k, v, slots, pos, cache, table, E)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.norm(h[-1:])


def _qkv(attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The attention layer's rotated q, k and v for `x` (as models/llama.py computes them)."""
    T = x.shape[0]
    q, k, v = attn.qkv_proj(x).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q = q.view(T, attn.num_heads, attn.head_dim)
    k = k.view(T, attn.num_kv_heads, attn.head_dim)
    v = v.view(T, attn.num_kv_heads, attn.head_dim)
    if attn.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def kv_deviation(cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per token: squared distance between fresh k/v [T, KVH, D] and those in the cache at `slots`."""
    _, nb, bs, kvh, d = cache.shape
    k_old = cache[0].view(nb * bs, kvh, d).index_select(0, slots)
    v_old = cache[1].view(nb * bs, kvh, d).index_select(0, slots)
    return ((k.float() - k_old.float()) ** 2).sum((1, 2)) + ((v.float() - v_old.float()) ** 2).sum((1, 2))


def _select(cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            reused: torch.Tensor, n_sel: int) -> torch.Tensor:
    """Indices (ascending) of the tokens to recompute: every token not placed from a chunk,
    and the `n_sel` placed ones whose K/V deviate most."""
    chosen = ~reused
    placed = reused.nonzero().squeeze(1)
    if n_sel > 0 and len(placed):
        dev = kv_deviation(cache, slots[placed], k[placed], v[placed])
        chosen[placed[dev.topk(n_sel).indices]] = True
    return chosen.nonzero().squeeze(1)


def _attend(runner: ModelRunner, attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            slots: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, E: int) -> torch.Tensor:
    """Write k/v of the selected tokens, attend their queries (at positions `pos`) to the whole
    context [0, E) of the request, causally by position; the attention block's output."""
    runner.backend.write_kv(cache, k, v, slots)
    keys = cache[0].index_select(0, table).flatten(0, 1)[:E]  # [E, KVH, D]
    values = cache[1].index_select(0, table).flatten(0, 1)[:E]
    mask = torch.arange(E, device=q.device)[None, :] <= pos[:, None]  # [M, E] True = attend
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, scale=runner.backend.scale, enable_gqa=attn.num_heads != attn.num_kv_heads,
    ).squeeze(0).transpose(0, 1)  # [M, H, D]
    return attn.o_proj(o.reshape(q.shape[0], attn.q_size))
