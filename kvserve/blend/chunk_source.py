"""The chunk cache: document chunks' KV in the device pool under position-independent hashes.

A KV source (core/kv_sources.py) beside the device prefix cache, in the same block
pool: chunk blocks are ordinary cached blocks (ref counts, LRU eviction shared with
prefix blocks, the pool's eviction hook, so the offload tiers see them too); only
their hashes differ.  A chunk's hashes chain over its own tokens from a chunk root
(namespace + "chunk"), not over what precedes it in a prompt, so a chunk found
once is found wherever it appears.  A chunk is computed after the prompt's first
token (the attention sink), which its hashes cover too.  A partial last block is registered too, under
a hash that also names its length.

Life of one admission (a request with segments, see spec.py):

    plan      supplies no tokens itself (the prefix cache before it does); the blend
              happens in the step that runs the rest of the prompt
    placed    after the prefix hit S is final: for each document segment starting at
              or after S, find its chunk blocks (a hit) or take fresh ones (a miss, the
              runner computes the chunk alone first); hold them all for the step
              (KVCacheManager.hold_blocks) and leave a BlendStep on the request
    poll      (the next schedule: the step ran) register the chunks computed by an
              emitted step under their hashes, end the holds
    finished  the same for a request that finished in that step; a failed step
              (FINISHED_ERROR) registers nothing

Invariant: a chunk block is registered only after a step that wrote it completed, so
a lookup never finds KV that was not computed.  Pool short at `placed`: no blend, the
request is an ordinary prefill (`fallbacks`).
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

from kvserve.blend.spec import BlendStep, ChunkPlacement, num_selected, segment_starts
from kvserve.core.block_pool import KVBlock
from kvserve.core.kv_sources import KVPlan, KVSource
from kvserve.hashing import BlockHash, hash_block
from kvserve.request import Request, RequestStatus

if TYPE_CHECKING:
    from kvserve.core.kv_cache_manager import KVCacheManager
    from kvserve.protocol import KVLoad


def chunk_hashes(token_ids: Sequence[int], block_size: int, namespace: bytes = b"") -> list[BlockHash]:
    """Hashes of a chunk's blocks (`token_ids`: the sink, then the chunk's tokens): its full
    blocks chained from the chunk root, then its partial last block (if any) under a hash
    that also names its length.  Depends on the tokens and the namespace (model, dtype)
    only, never on the chunk's position in a prompt."""
    root = hashlib.sha256(b"kvserve-chunk-v1" + struct.pack("<I", len(namespace)) + namespace).digest()
    out: list[BlockHash] = []
    prev = root
    num_full = len(token_ids) // block_size
    for i in range(num_full):
        prev = hash_block(prev, token_ids[i * block_size:(i + 1) * block_size], namespace)
        out.append(prev)
    tail = token_ids[num_full * block_size:]
    if tail:
        out.append(hash_block(prev, tail, namespace + b"tail:%d" % len(tail)))
    return out


@dataclass(slots=True)
class ChunkStats:
    """Monotonic counters (chunks, tokens) for metrics."""

    hits: int = 0  # chunks found in the pool
    misses: int = 0  # chunks computed (then cached)
    blends: int = 0  # requests blended
    fallbacks: int = 0  # requests with chunks that ran as ordinary prefills (pool short, chunked prefill)
    tokens_reused: int = 0  # chunk tokens placed from cache and not recomputed
    tokens_recomputed: int = 0  # chunk tokens recomputed by the selection
    tokens_chunked: int = 0  # chunk tokens in blended requests (denominator of the recomputed fraction)

    def recomputed_fraction(self) -> float:
        return self.tokens_recomputed / self.tokens_chunked if self.tokens_chunked else 0.0


@dataclass(slots=True)
class _Hold:
    owner: str
    step: BlendStep
    # Per computed chunk: its blocks and hashes (registered after the step ran).
    computed: list[tuple[list[KVBlock], list[BlockHash]]] = field(default_factory=list)


class ChunkCache(KVSource):
    """Document chunks at any position (CacheBlend).  Needs prefix caching (blocks by hash)."""

    name = "chunks"

    def __init__(self, kv: KVCacheManager, ratio: float = 0.15, check_layer: int = 1,
                 namespace: bytes = b"", sink_tokens: int = 1) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"blend_recompute_ratio must be in [0, 1], got {ratio}")
        self.kv = kv
        self.block_size = kv.block_size
        self.ratio = ratio  # the default of requests that do not name one
        self.check_layer = check_layer
        self.namespace = namespace
        # Chunks are computed after the prompt's first `sink_tokens` tokens (BOS, or the chat
        # template's first token): without them a chunk's first token becomes its attention
        # sink and every chunk token's KV is far from what it is in a real prompt.
        self.sink_tokens = sink_tokens
        self.stats = ChunkStats()
        self._holds: dict[str, _Hold] = {}  # request id -> blocks held for its blend step
        # Chunks taken fresh since the last poll (not registered yet): root hash -> (blocks, hashes);
        # a second request in the same step shares them and computes them too (same values).
        self._fresh: dict[BlockHash, tuple[list[KVBlock], list[BlockHash]]] = {}

    # ------------------------------------------------------------- the source
    def plan(self, request: Request, num_supplied: int, repeat: bool) -> Optional[KVPlan]:
        if request.segment_lens is None or len(request.segment_lens) < 3 or not self.kv.enable_prefix_caching:
            return None
        return KVPlan(self, 0)

    def placed(self, request: Request, plan: KVPlan, block_ids: list[int]) -> list[KVLoad]:
        rid = request.request_id
        self._end_hold(rid, register=False)  # an earlier admission's hold (never the case after a poll)
        assert request.segment_lens is not None
        start = request.num_computed_tokens  # the prefix cache (and tiers) supply [0, start)
        docs = [(s, n) for s, n in zip(segment_starts(request.segment_lens)[1:-1], request.segment_lens[1:-1])
                if s >= start]
        if not docs:
            return []
        sink = request.prompt_token_ids[:self.sink_tokens]
        shared: list[KVBlock] = []
        found: list[tuple[int, int, list[BlockHash], Optional[list[KVBlock]], bool]] = []
        num_fresh = 0
        for s, n in docs:
            tokens = request.prompt_token_ids[s:s + n]
            hashes = chunk_hashes([*sink, *tokens], self.block_size, self.namespace)
            cached = [self.kv.pool.get_cached_block(h) for h in hashes]
            if all(b is not None for b in cached):
                blocks = [b for b in cached if b is not None]
                shared.extend(blocks)
                found.append((s, n, hashes, blocks, False))
            elif hashes[0] in self._fresh and self._fresh[hashes[0]][1] == hashes:
                blocks = self._fresh[hashes[0]][0]
                shared.extend(blocks)
                found.append((s, n, hashes, blocks, True))
            else:
                found.append((s, n, hashes, None, True))
                num_fresh += len(hashes)
        owner = f"{rid}\x00chunks"
        fresh = self.kv.hold_blocks(owner, _unique(shared), num_fresh)
        if fresh is None:
            self.stats.fallbacks += 1
            return []
        hold = _Hold(owner, BlendStep([], request.blend_ratio, self.check_layer))
        for s, n, hashes, blocks, compute in found:
            if blocks is None:
                blocks, fresh = fresh[:len(hashes)], fresh[len(hashes):]
                self._fresh[hashes[0]] = (blocks, hashes)
            if compute:
                hold.computed.append((blocks, hashes))
            tokens = request.prompt_token_ids[s:s + n] if compute else []
            hold.step.chunks.append(ChunkPlacement(s, n, [b.block_id for b in blocks], compute, tokens, sink))
            if compute:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
        self._holds[rid] = hold
        request.pending_blend = hold.step
        return []

    def poll(self) -> list[str]:
        # A new schedule: the step that carried the holds has run.
        for rid in list(self._holds):
            self._end_hold(rid, register=True)
        self._fresh.clear()
        return []

    def on_finished(self, request: Request, kv: KVCacheManager) -> None:
        request.pending_blend = None
        self._end_hold(request.request_id, register=request.status != RequestStatus.FINISHED_ERROR)

    # ---------------------------------------------------------------- helpers
    def _end_hold(self, rid: str, register: bool) -> None:
        hold = self._holds.pop(rid, None)
        if hold is None:
            return
        step = hold.step
        if step.emitted:
            self.stats.blends += 1
            chunked = step.reused_tokens
            recomputed = num_selected(step.ratio, chunked)
            self.stats.tokens_chunked += chunked
            self.stats.tokens_recomputed += recomputed
            self.stats.tokens_reused += chunked - recomputed
            if register:
                for blocks, hashes in hold.computed:
                    for block, block_hash in zip(blocks, hashes):
                        self.kv.register_block(block, block_hash)
        else:
            self.stats.fallbacks += 1
        self.kv.release_blocks(hold.owner)


def _unique(blocks: list[KVBlock]) -> list[KVBlock]:
    """Blocks in order, each once (one chunk may appear twice in a prompt)."""
    seen: set[int] = set()
    out = []
    for b in blocks:
        if b.block_id not in seen:
            seen.add(b.block_id)
            out.append(b)
    return out
