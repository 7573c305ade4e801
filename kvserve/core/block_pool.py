"""BlockPool: the device KV blocks, their ref counts, and the prefix cache index.

Invariants (checked by `check_integrity`):
- every block with ref_cnt == 0 is in the free queue exactly once, every
  block with ref_cnt > 0 is not in it;
- the free queue is ordered for eviction: the head is evicted first.  Freed
  blocks are appended at the tail, so cached blocks are evicted in LRU order;
- a block is in `cached` (hash -> block) iff its `block_hash` is set.  A cached
  block that is free stays findable until it is popped for reuse ("lazy
  eviction"); popping it drops its hash.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from kvserve.hashing import BlockHash


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: Optional[BlockHash] = None
    # Doubly linked free-queue pointers; None when not in the queue (or at an end).
    prev_free: Optional["KVBlock"] = None
    next_free: Optional["KVBlock"] = None
    in_free_queue: bool = False


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) popleft, append and remove."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head: Optional[KVBlock] = None
        self._tail: Optional[KVBlock] = None
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVBlock) -> None:
        assert not block.in_free_queue, f"block {block.block_id} already free"
        block.prev_free, block.next_free = self._tail, None
        if self._tail is None:
            self._head = block
        else:
            self._tail.next_free = block
        self._tail = block
        block.in_free_queue = True
        self.num_free += 1

    def appendleft(self, block: KVBlock) -> None:
        """Put a block at the head: the next one to be reused."""
        assert not block.in_free_queue, f"block {block.block_id} already free"
        block.prev_free, block.next_free = None, self._head
        if self._head is None:
            self._tail = block
        else:
            self._head.prev_free = block
        self._head = block
        block.in_free_queue = True
        self.num_free += 1

    def popleft(self) -> KVBlock:
        block = self._head
        if block is None:
            raise ValueError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        assert block.in_free_queue, f"block {block.block_id} not free"
        if block.prev_free is None:
            self._head = block.next_free
        else:
            block.prev_free.next_free = block.next_free
        if block.next_free is None:
            self._tail = block.prev_free
        else:
            block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        block.in_free_queue = False
        self.num_free -= 1

    def __iter__(self):
        node = self._head
        while node is not None:
            yield node
            node = node.next_free


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}
        # Called with (block_hash, block_id) just before a cached block's
        # content is dropped; the offload tiers hook in here.
        self.on_evict: Optional[Callable[[BlockHash, int], None]] = None
        # Called with (block_hash, block_id) when a block is registered under its hash, and
        # with () when every hash is forgotten: KV events (core/kv_events.py) hook in here.
        self.on_cache: Optional[Callable[[BlockHash, int], None]] = None
        self.on_reset: Optional[Callable[[], None]] = None
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> Optional[KVBlock]:
        return self.cached.get(block_hash) if self.enable_caching else None

    def allocate(self, n: int) -> list[KVBlock]:
        """Pop `n` blocks for new content, evicting cached ones from the LRU head."""
        if n > self.free_queue.num_free:
            raise ValueError(f"cannot allocate {n} blocks, {self.free_queue.num_free} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._drop_hash(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on (possibly free, cached) blocks found in the cache."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching zero go to the free tail.

        Callers pass a request's blocks in *reverse* order so that a
        sequence's tail blocks (least likely to be shared) are evicted first.
        """
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None or not self.enable_caching:
                    # Uncached content is worthless: reuse it before cached blocks.
                    self.free_queue.appendleft(block)
                else:
                    self.free_queue.append(block)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full block under its hash (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return  # same content already cached in another block
        block.block_hash = block_hash
        self.cached[block_hash] = block
        if self.on_cache is not None:
            self.on_cache(block_hash, block.block_id)

    def _drop_hash(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self.on_evict is not None:
            self.on_evict(block.block_hash, block.block_id)
        del self.cached[block.block_hash]
        block.block_hash = None
        self.num_evictions += 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible when no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        if self.on_reset is not None:
            self.on_reset()
        return True

    def check_integrity(self) -> None:
        """Assert the invariants of the module doc.  O(num_blocks) with comprehensions
        only, so tests can afford it after every step."""
        blocks = self.blocks
        free = list(self.free_queue)
        assert len(free) == self.free_queue.num_free, "free count mismatch"
        assert len({b.block_id for b in free}) == len(free), "a block is twice in the free queue"
        assert all(b.in_free_queue for b in free), "a queued block is not marked free"
        # Every block marked free is queued (counts match and queued ones are marked),
        # and marked free <=> ref_cnt == 0.
        assert sum(b.in_free_queue for b in blocks) == len(free), "a block marked free is not queued"
        bad = [b.block_id for b in blocks if (b.ref_cnt == 0) != b.in_free_queue or b.ref_cnt < 0]
        assert not bad, f"blocks {bad[:8]}: ref_cnt and free-queue membership disagree"
        # `cached` indexes exactly the blocks whose hash is set.
        hashed = [b for b in blocks if b.block_hash is not None]
        assert len(hashed) == len(self.cached), "cache index and block hashes disagree in number"
        cached = self.cached
        missing = [b.block_id for b in hashed if cached.get(b.block_hash) is not b]  # type: ignore[arg-type]
        assert not missing, f"blocks {missing[:8]}: hash not indexed"
