"""KVCacheManager: a request's KV memory through a few verbs.

    get_computed_blocks(request)  -> the longest cached prefix (blocks, tokens)
    allocate_slots(request, n, computed_blocks, loaded_hashes)
                                  -> room for n more tokens (and for blocks loaded
                                     from an offload tier), or None
    allocate_plans(request, n, plans)
                                  -> the same for the plans of KV sources (core/kv_sources.py):
                                     the block ids each plan got, or None
    free(request)                 -> release everything (cached blocks stay evictable)
    fork(parent, child)           -> share the parent's full prompt blocks (n > 1)

The manager never touches tensors: block ids are the handle the model runner
uses to address the per-layer pools.  Pure Python, unit-tested on exact state.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

from kvserve.core.block_pool import BlockPool, KVBlock
from kvserve.hashing import BlockHash
from kvserve.request import Request

if TYPE_CHECKING:
    from kvserve.core.kv_sources import KVPlan


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        # request_id -> its block table (append-only while the request holds blocks)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        # request_id -> how many of its leading blocks are registered in the cache
        self.num_cached_blocks: dict[str, int] = {}
        # Prefix-cache statistics (in tokens), for metrics.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._evict_listeners: list[Callable[[BlockHash, int], None]] = []

    def add_evict_listener(self, listener: Callable[[BlockHash, int], None]) -> None:
        """Call `listener(block_hash, block_id)` just before a cached block's content is
        dropped for reuse (its KV is intact until the next forward pass)."""
        self._evict_listeners.append(listener)
        # One listener (the usual case) is called directly: no dispatch on the allocation path.
        self.pool.on_evict = listener if len(self._evict_listeners) == 1 else self._notify_evict

    def _notify_evict(self, block_hash: BlockHash, block_id: int) -> None:
        for listener in self._evict_listeners:
            listener(block_hash, block_id)

    def holds_blocks(self, request_id: str) -> bool:
        """True while the request holds a block table (a running request, or a forked sample)."""
        return request_id in self.req_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def block_ids(self, request_id: str, start: int = 0) -> list[int]:
        """Ids of the request's blocks from index `start` on (its whole table by default)."""
        blocks = self.req_blocks.get(request_id)
        if not blocks:
            return []
        return [b.block_id for b in (blocks[start:] if start else blocks)]

    def num_request_blocks(self, request_id: str) -> int:
        return len(self.req_blocks.get(request_id, ()))

    # ---------------------------------------------------------------- lookup
    def get_computed_blocks(self, request: Request, count_stats: bool = True) -> tuple[list[KVBlock], int]:
        """Longest run of cached leading blocks of `request`.

        The last token is never matched from cache: its logits are needed to
        sample the next token, so at least one token is always computed.
        `count_stats=False` for a repeated lookup of the same admission (a
        request back from an offload-tier load), so hit rates count it once.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        if count_stats:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += len(blocks) * self.block_size
        return blocks, len(blocks) * self.block_size

    def num_blocks_needed(self, request: Request, num_new_tokens: int,
                          new_computed_blocks: Sequence[KVBlock] = (), num_loaded_blocks: int = 0) -> int:
        """Free blocks that allocate_slots would take from the pool."""
        have = len(self.req_blocks.get(request.request_id, ())) + len(new_computed_blocks) + num_loaded_blocks
        total = request.num_computed_tokens + num_new_tokens
        new = max(0, cdiv(total, self.block_size) - have)
        evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        return new + evictable_hits + num_loaded_blocks

    # ------------------------------------------------------------ allocation
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
        loaded_hashes: Sequence[BlockHash] = (),
    ) -> Optional[list[KVBlock]]:
        """Make room for `num_new_tokens` tokens after `request.num_computed_tokens`.

        `request.num_computed_tokens` must already count the tokens of
        `new_computed_blocks` (the prefix-cache hit) and of `loaded_hashes`:
        blocks found in an offload tier, continuing the hit, whose content the
        model runner copies in before this step's forward.  They get fresh
        device blocks registered under those hashes (a tier hit is promoted
        into the prefix cache).  Returns the newly allocated blocks after the
        loaded ones, or None (and changes nothing) if the pool is short.
        """
        need = self.num_blocks_needed(request, num_new_tokens, new_computed_blocks, len(loaded_hashes))
        if need > self.pool.num_free_blocks:
            return None
        blocks = self.req_blocks.setdefault(request.request_id, [])
        self.num_cached_blocks.setdefault(request.request_id, 0)
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            self.num_cached_blocks[request.request_id] = len(blocks)
        if loaded_hashes:
            # Registered now, written by the runner before this step's forward
            # (the same timing argument as _cache_full_blocks).  If a hash is
            # already cached in another block, the first writer wins and this
            # block just holds a private copy.
            loaded = self.pool.allocate(len(loaded_hashes))
            for block, block_hash in zip(loaded, loaded_hashes):
                self.pool.cache_block(block, block_hash)
            blocks.extend(loaded)
            self.num_cached_blocks[request.request_id] = len(blocks)
        total = request.num_computed_tokens + num_new_tokens
        num_new_blocks = max(0, cdiv(total, self.block_size) - len(blocks))
        new_blocks = self.pool.allocate(num_new_blocks)
        blocks.extend(new_blocks)
        self._cache_full_blocks(request, total)
        return new_blocks

    def allocate_plans(self, request: Request, num_new_tokens: int,
                       plans: Sequence[KVPlan]) -> Optional[list[list[int]]]:
        """Execute KV-source plans and make room for `num_new_tokens` more tokens.

        `request.num_computed_tokens` must already count the plans' tokens.  Plans
        sharing device blocks come before plans filling fresh ones (kv_sources.py).
        Returns the device block ids each plan got, in plan order, or None (and
        changes nothing) if the pool is short.
        """
        shared: list[KVBlock] = []
        fills: list[BlockHash] = []
        for plan in plans:
            assert not (plan.shared_blocks and fills), "a plan sharing device blocks after one filling blocks"
            shared.extend(plan.shared_blocks)
            fills.extend(plan.fill_hashes)
        first = len(self.req_blocks.get(request.request_id, ()))
        if self.allocate_slots(request, num_new_tokens, shared, fills) is None:
            return None
        table = self.req_blocks[request.request_id]
        placed = []
        for plan in plans:
            n = len(plan.shared_blocks) + len(plan.fill_hashes)
            placed.append([b.block_id for b in table[first:first + n]])
            first += n
        return placed

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register blocks that are full once `num_tokens` tokens are written.

        Registration happens when the step is scheduled, before the KV is
        written; this is safe because within a step every layer writes its new
        K/V before any attention of that layer reads the pool.
        """
        if not self.enable_prefix_caching:
            return
        blocks = self.req_blocks[request.request_id]
        start = self.num_cached_blocks[request.request_id]
        end = min(num_tokens // self.block_size, len(request.block_hashes), len(blocks))
        for i in range(start, end):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        if end > start:
            self.num_cached_blocks[request.request_id] = end

    def cached_blocks(self, request: Request) -> list[tuple[BlockHash, int]]:
        """(hash, block id) of the request's leading blocks registered in the prefix cache."""
        blocks = self.req_blocks.get(request.request_id, ())
        n = self.num_cached_blocks.get(request.request_id, 0)
        return [(b.block_hash, b.block_id) for b in blocks[:n] if b.block_hash is not None]

    # --------------------------------------------------------------- release
    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

    def fork(self, parent: Request, child: Request) -> int:
        """Give `child` (same prompt as `parent`) the parent's full prompt blocks.

        The child shares every block that lies entirely before the last prompt
        token; it recomputes the rest itself (at most `block_size` tokens), so
        no block is ever written by two sequences.  Returns the shared tokens,
        which the caller stores as the child's `num_computed_tokens`.
        """
        parent_blocks = self.req_blocks.get(parent.request_id, [])
        num_shared = min((parent.num_prompt_tokens - 1) // self.block_size, len(parent_blocks))
        shared = parent_blocks[:num_shared]
        self.pool.touch(shared)
        self.req_blocks[child.request_id] = list(shared)
        self.num_cached_blocks[child.request_id] = min(
            num_shared, self.num_cached_blocks.get(parent.request_id, 0)
        )
        return num_shared * self.block_size

    # ------------------------------------------------------- held outside requests
    def hold_blocks(self, owner: str, shared: Sequence[KVBlock], num_fresh: int) -> Optional[list[KVBlock]]:
        """Take a reference on cached `shared` blocks and on `num_fresh` new blocks for `owner`,
        a holder that is not a request (CacheBlend chunks read or written by a step); held
        blocks are never evicted.  Returns the fresh blocks, or None (nothing changed) when the
        pool is short.  `owner` must not hold blocks already; `release_blocks` ends the hold."""
        assert owner not in self.req_blocks, f"{owner} already holds blocks"
        need = num_fresh + sum(1 for b in shared if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks:
            return None
        self.pool.touch(shared)
        fresh = self.pool.allocate(num_fresh)
        self.req_blocks[owner] = [*shared, *fresh]
        return fresh

    def register_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a held block under `block_hash` once its KV is written (first writer wins)."""
        self.pool.cache_block(block, block_hash)

    def release_blocks(self, owner: str) -> None:
        """End `owner`'s hold (cached blocks stay findable until evicted)."""
        blocks = self.req_blocks.pop(owner, None)
        if blocks:
            self.pool.free(reversed(blocks))

    def trim(self, request: Request, num_tokens: int) -> bool:
        """Free the request's blocks after the first cdiv(num_tokens, block_size): speculative
        decoding, after a verifier rejected drafts, drops the blocks that held only rejected
        KV.  Never trims registered (cached) blocks.  True when the table shrank."""
        blocks = self.req_blocks.get(request.request_id)
        if not blocks:
            return False
        keep = max(cdiv(num_tokens, self.block_size), self.num_cached_blocks.get(request.request_id, 0))
        if keep >= len(blocks):
            return False
        tail = blocks[keep:]
        del blocks[keep:]
        self.pool.free(reversed(tail))
        return True

    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    # ------------------------------------------------------------- integrity
    def check_integrity(self) -> None:
        """Assert every invariant of the pool and of the per-request tables."""
        self.pool.check_integrity()
        refs = [0] * self.pool.num_blocks
        for req_id, blocks in self.req_blocks.items():
            ids = [b.block_id for b in blocks]
            assert len(ids) == len(set(ids)), f"{req_id} holds a block twice: {ids}"
            for i in ids:
                refs[i] += 1
            assert self.num_cached_blocks.get(req_id, 0) <= len(blocks)
        bad = [b.block_id for b in self.pool.blocks if b.ref_cnt != refs[b.block_id]]
        assert not bad, (f"block {bad[0]}: ref_cnt {self.pool.blocks[bad[0]].ref_cnt} "
                         f"but held {refs[bad[0]]} times")
