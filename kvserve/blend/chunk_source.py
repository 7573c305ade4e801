"""The chunk cache: document chunks' KV in the device pool under position-independent hashes.

A KV source (core/kv_sources.py) beside the device prefix cache, in the same block
pool: chunk blocks are ordinary cached blocks (ref counts, LRU eviction shared with
prefix blocks, the pool's eviction hook, so the offload tiers see them too); only
their hashes differ.  A chunk's hashes chain over its own tokens from a chunk root
(namespace + "chunk"), not over what precedes it in a prompt, so a chunk found
once is found wherever it appears.  A chunk is computed after its *sink*, the prompt's
first segment (the system prompt / instruction every prompt of an application starts with;
`sink_tokens` caps it, 1 = the BOS alone), which its hashes cover too: a document is found
again in any order and at any position after the same first segment.  A partial last block
is registered too, under a hash that also names its length.

Life of one admission (a request with segments, see spec.py):

    plan      supplies no tokens itself (the prefix cache before it does); the blend
              happens in the step that runs the rest of the prompt
    placed    after the prefix hit S is final: for each document segment starting at
              or after S, find its chunk blocks (a hit) or take fresh ones (a miss, the
              runner computes the chunk alone first); hold them all for the step
              (KVCacheManager.hold_blocks) and leave a BlendStep on the request
    poll      (the next schedule: the step ran) register the chunks computed by an
              emitted step (and those loaded from a tier) under their hashes, end the holds

With KV offload tiers, chunk blocks go down like prefix blocks (evicted ones under the
`evict` policy; under `finish`, a chunk as soon as it is computed), and come back up:
at `plan`, documents not on the device whose every block a tier holds are fetched first
(the request waits in WAITING_FOR_KV, as for a prefix load), under the load id
"<request id>\x00chunks"; `placed` then copies them into fresh blocks (a KVLoad) and
blends them like device hits.
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
from kvserve.core.kv_offload import KVOffloadManager
from kvserve.core.kv_sources import KVPlan, KVSource
from kvserve.hashing import BlockHash, hash_block
from kvserve.protocol import KVLoad
from kvserve.request import Request, RequestStatus

if TYPE_CHECKING:
    from kvserve.core.kv_cache_manager import KVCacheManager


def chunk_hashes(token_ids: Sequence[int], block_size: int, namespace: bytes = b"") -> list[BlockHash]:
    """Hashes of a chunk's blocks (`token_ids`: the sink, then the chunk's tokens): its full
    blocks chained from the chunk root, then its partial last block (if any) under a hash
    that also names its length.  Depends on the tokens and the namespace (model, dtype)
    only, never on the chunk's position in a prompt.  The root names every token of the chunk,
    so no block is shared between two chunks: with a sink of a block or more, every chunk's
    first blocks would otherwise have the same hash (the pure-sink blocks), and code that keys
    a chunk by its first hash (fresh chunks, tier loads) would mix chunks up."""
    content = hashlib.sha256(struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()
    root = hashlib.sha256(b"kvserve-chunk-v2" + struct.pack("<I", len(namespace)) + namespace + content).digest()
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

    hits: int = 0  # chunks found in the pool (or loaded from a tier)
    tier_hits: int = 0  # of which loaded from a KV tier
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
    request: Request
    # Per computed chunk: its blocks and hashes (registered after the step ran, if it carried the blend).
    computed: list[tuple[list[KVBlock], list[BlockHash]]] = field(default_factory=list)
    # Per chunk loaded from a tier: registered after the step whether or not it blended (the load ran).
    loaded: list[tuple[list[KVBlock], list[BlockHash]]] = field(default_factory=list)


class ChunkCache(KVSource):
    """Document chunks at any position (CacheBlend).  Needs prefix caching (blocks by hash)."""

    name = "chunks"

    def __init__(self, kv: KVCacheManager, ratio: float = 0.15, check_layer: int = 1,
                 namespace: bytes = b"", sink_tokens: Optional[int] = None,
                 offload: Optional[KVOffloadManager] = None) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"blend_recompute_ratio must be in [0, 1], got {ratio}")
        self.kv = kv
        self.block_size = kv.block_size
        self.ratio = ratio  # the default of requests that do not name one
        self.check_layer = check_layer
        self.namespace = namespace
        # Chunks are computed after the prompt's first segment (at most `sink_tokens` of its
        # tokens; None: all of it).  Without a sink a chunk's first token becomes its attention
        # sink and every chunk token's KV is far from what it is in a real prompt; with the BOS
        # alone (sink_tokens=1) the demo model still loses half its exact matches at ratio 0
        # (docs/cacheblend.md: the first segment holds the tokens later layers attend to).
        if sink_tokens is not None and sink_tokens < 1:
            raise ValueError(f"sink_tokens must be at least 1 (or None: the whole first segment), got {sink_tokens}")
        self.sink_tokens = sink_tokens
        self.stats = ChunkStats()
        self.offload = offload  # the KV tiers (None: device only)
        self._loading: dict[str, list[list[BlockHash]]] = {}  # request id -> chunks fetched from a tier
        self._holds: dict[str, _Hold] = {}  # request id -> blocks held for its blend step
        # Chunks taken fresh since the last poll (not registered yet): root hash -> (blocks, hashes);
        # a second request in the same step shares them and computes them too (same values).
        self._fresh: dict[BlockHash, tuple[list[KVBlock], list[BlockHash]]] = {}

    # ------------------------------------------------------------- the source
    def plan(self, request: Request, num_supplied: int, repeat: bool) -> Optional[KVPlan]:
        if request.segment_lens is None or len(request.segment_lens) < 3 or not self.kv.enable_prefix_caching:
            return None
        if self.offload is not None and not self.offload.has_ready_load(_load_id(request.request_id)):
            wanted = [h for _, _, h in self._docs(request, num_supplied)
                      if any(self.kv.pool.get_cached_block(x) is None for x in h)]
            in_tiers = [h for h in wanted if self.offload.client.lookup(h) == len(h)]
            if in_tiers:
                return KVPlan(self, 0, ready=False, state=in_tiers)
        return KVPlan(self, 0)

    def fetch(self, request: Request, plan: KVPlan) -> None:
        assert self.offload is not None
        chunks: list[list[BlockHash]] = plan.state
        self._loading[request.request_id] = chunks
        self.offload.start_load(_load_id(request.request_id), 0, [h for c in chunks for h in c])

    def _docs(self, request: Request, start: int) -> list[tuple[int, int, list[BlockHash]]]:
        """(start, length, chunk hashes) of each document segment starting at or after `start`."""
        assert request.segment_lens is not None
        sink = self._sink(request)
        out = []
        for s, n in zip(segment_starts(request.segment_lens)[1:-1], request.segment_lens[1:-1]):
            if s >= start:
                out.append((s, n, chunk_hashes([*sink, *request.prompt_token_ids[s:s + n]], self.block_size,
                                               self.namespace)))
        return out

    def _sink(self, request: Request) -> list[int]:
        """The tokens a chunk of `request` is computed after: its first segment (capped)."""
        assert request.segment_lens is not None
        n = request.segment_lens[0] if self.sink_tokens is None else min(self.sink_tokens, request.segment_lens[0])
        return request.prompt_token_ids[:n]

    def _take_loaded(self, rid: str) -> list[list[BlockHash]]:
        """The chunks a finished tier load brought in whole, in load order (consumed)."""
        chunks = self._loading.pop(rid, [])
        if self.offload is None or not self.offload.has_ready_load(_load_id(rid)):
            return []
        hashes, _ = self.offload.usable_load(_load_id(rid), 0)
        n = len(hashes)
        whole = []
        for c in chunks:
            if len(c) > n:
                break
            whole.append(c)
            n -= len(c)
        return whole

    def placed(self, request: Request, plan: KVPlan, block_ids: list[int]) -> list[KVLoad]:
        rid = request.request_id
        self._end_hold(rid, register=False)  # an earlier admission's hold (never the case after a poll)
        loaded = self._take_loaded(rid)
        docs = self._docs(request, request.num_computed_tokens)  # the sources before supply [0, S)
        if not docs and not loaded:
            self._drop_load(rid)
            return []
        # Where each document's blocks come from: the pool, this step's fresh chunks, a tier load
        # (fresh blocks, copied in before the forward), or nowhere (fresh blocks, computed).
        shared: list[KVBlock] = []
        found: list[tuple[int, int, list[BlockHash], str]] = []
        for s, n, hashes in docs:
            cached = [self.kv.pool.get_cached_block(h) for h in hashes]
            if all(b is not None for b in cached):
                shared.extend(b for b in cached if b is not None)
                found.append((s, n, hashes, "device"))
            elif hashes[0] in self._fresh and self._fresh[hashes[0]][1] == hashes:
                shared.extend(self._fresh[hashes[0]][0])
                found.append((s, n, hashes, "fresh"))
            elif hashes in loaded:
                found.append((s, n, hashes, "tier"))
            else:
                found.append((s, n, hashes, "compute"))
        num_loaded = sum(len(c) for c in loaded)
        num_compute = sum(len(h) for _, _, h, kind in found if kind == "compute")
        fresh = self.kv.hold_blocks(_load_id(rid), _unique(shared), num_loaded + num_compute)
        if fresh is None:
            self.stats.fallbacks += 1
            self._drop_load(rid)
            return []
        hold = _Hold(_load_id(rid), BlendStep([], request.blend_ratio, self.check_layer), request)
        loads: list[KVLoad] = []
        if loaded:  # one copy of the load's leading blocks, in load order
            loads.append(KVLoad(_load_id(rid), 0, [b.block_id for b in fresh[:num_loaded]]))
            assert self.offload is not None
            self.offload.consume_load(_load_id(rid), num_loaded, 0)
        by_first: dict[BlockHash, list[KVBlock]] = {}
        for c in loaded:
            by_first[c[0]], fresh = fresh[:len(c)], fresh[len(c):]
            hold.loaded.append((by_first[c[0]], c))
        sink = self._sink(request)
        for s, n, hashes, kind in found:
            if kind == "device":
                blocks = [b for b in (self.kv.pool.get_cached_block(h) for h in hashes) if b is not None]
            elif kind == "fresh":
                blocks = self._fresh[hashes[0]][0]
            elif kind == "tier":
                blocks = by_first[hashes[0]]
            else:
                blocks, fresh = fresh[:len(hashes)], fresh[len(hashes):]
                self._fresh[hashes[0]] = (blocks, hashes)
            compute = kind in ("fresh", "compute")
            if compute:
                hold.computed.append((blocks, hashes))
            tokens = request.prompt_token_ids[s:s + n] if compute else []
            hold.step.chunks.append(ChunkPlacement(s, n, [b.block_id for b in blocks], compute, tokens, sink))
            self.stats.misses += compute
            self.stats.hits += not compute
            self.stats.tier_hits += kind == "tier"
        self._holds[rid] = hold
        request.pending_blend = hold.step
        return loads

    def poll(self) -> list[str]:
        # A new schedule: the step that carried the holds has run.
        for rid in list(self._holds):
            self._end_hold(rid, register=True)
        self._fresh.clear()
        if self.offload is None:
            return []
        return [rid for rid in self._loading if self.offload.has_ready_load(_load_id(rid))]

    def on_finished(self, request: Request, kv: KVCacheManager) -> None:
        request.pending_blend = None
        self._end_hold(request.request_id, register=request.status != RequestStatus.FINISHED_ERROR)
        self._loading.pop(request.request_id, None)
        self._drop_load(request.request_id)

    def _drop_load(self, rid: str) -> None:
        """Forget a tier load of the request's chunks (in flight or ready), if there is one."""
        load_id = _load_id(rid)
        if self.offload is not None and (load_id in self.offload.loads_in_flight
                                         or self.offload.has_ready_load(load_id)):
            self.offload.cancel(load_id)

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
        else:
            self.stats.fallbacks += 1
        if register:
            done = (hold.computed if step.emitted else []) + hold.loaded
            for blocks, hashes in done:
                for block, block_hash in zip(blocks, hashes):
                    self.kv.register_block(block, block_hash)
            if self.offload is not None and step.emitted:  # under "finish": computed chunks go down now
                self.offload.on_request_finished(hold.request, [(h, b.block_id) for blocks, hashes in hold.computed
                                                                for b, h in zip(blocks, hashes)])
        self.kv.release_blocks(hold.owner)


def _load_id(request_id: str) -> str:
    """The holder / tier-load id of a request's chunks (never a request id)."""
    return f"{request_id}\x00chunks"


def _unique(blocks: list[KVBlock]) -> list[KVBlock]:
    """Blocks in order, each once (one chunk may appear twice in a prompt)."""
    seen: set[int] = set()
    out = []
    for b in blocks:
        if b.block_id not in seen:
            seen.add(b.block_id)
            out.append(b)
    return out
