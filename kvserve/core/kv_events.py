"""KV events: the prefix cache's stored / removed block hashes, in order, as plain data.

`KVEventRecorder.attach(manager)` hooks a `KVCacheManager`'s block pool:
  * a block registered under its hash (BlockPool.cache_block)        -> ("stored",  [hash])
  * a cached block whose hash is dropped for reuse (lazy eviction)   -> ("removed", [hash])
  * the whole prefix cache forgotten (BlockPool.reset_prefix_cache)  -> ("all_cleared", [])

Replaying the events in order onto an empty set gives exactly `pool.cached`'s keys: a hash is
cached in at most one block, so its events alternate stored / removed.  `take()` hands over what
was recorded since the last call (consecutive events of one kind merged into one record).  The
consumer (the engine process, engine_process.py) sends them to the API process, which serves them
to routers (entrypoints/openai/kv_events.py; the router's format: router/kv_events.py).

Memory is bounded: past `max_pending` recorded hashes nobody took, the record is replaced by a
snapshot of the cache at the next `take()` (all_cleared, then every cached hash), which is exact.
Pure Python, no torch (core/ rule).
"""
from __future__ import annotations

from typing import Literal

from kvserve.core.block_pool import BlockPool
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.hashing import BlockHash

KVEventKind = Literal["stored", "removed", "all_cleared"]
# One record: a kind and its hashes (empty for all_cleared), in cache order.
KVEventRecord = tuple[KVEventKind, list[BlockHash]]

DEFAULT_MAX_PENDING = 1 << 18  # hashes (~8 MiB of digests) before the record becomes a snapshot


class KVEventRecorder:
    """Records one block pool's prefix-cache changes until `take()`."""

    def __init__(self, pool: BlockPool, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.pool = pool
        self.max_pending = max_pending
        self._records: list[KVEventRecord] = []
        self._num_pending = 0  # hashes in _records
        self._overflowed = False
        self.num_snapshots = 0  # takes that had to send a snapshot (overflow)

    @classmethod
    def attach(cls, manager: KVCacheManager, max_pending: int = DEFAULT_MAX_PENDING) -> KVEventRecorder:
        """A recorder fed by `manager`'s pool from now on (its cache should be empty now, or the
        consumer should start from `snapshot()`)."""
        rec = cls(manager.pool, max_pending)
        manager.add_evict_listener(rec.on_removed)
        pool = manager.pool
        if pool.on_cache is not None or pool.on_reset is not None:
            raise RuntimeError("this block pool already has a KV event recorder")
        pool.on_cache = rec.on_stored
        pool.on_reset = rec.on_cleared
        return rec

    # ------------------------------------------------------------ pool hooks
    def on_stored(self, block_hash: BlockHash, block_id: int) -> None:
        self._add("stored", block_hash)

    def on_removed(self, block_hash: BlockHash, block_id: int) -> None:
        self._add("removed", block_hash)

    def on_cleared(self) -> None:
        # Everything before a clear is moot: the consumer clears too.
        self._records = [("all_cleared", [])]
        self._num_pending = 0
        self._overflowed = False

    def _add(self, kind: KVEventKind, block_hash: BlockHash) -> None:
        if self._overflowed:
            return  # the next take() sends a snapshot
        if self._num_pending >= self.max_pending:
            self._overflowed = True
            self._records = []
            self._num_pending = 0
            return
        records = self._records
        if records and records[-1][0] == kind:
            records[-1][1].append(block_hash)
        else:
            records.append((kind, [block_hash]))
        self._num_pending += 1

    # --------------------------------------------------------------- consumer
    def take(self) -> list[KVEventRecord]:
        """Everything recorded since the last take (or a snapshot after an overflow)."""
        if self._overflowed:
            self._overflowed = False
            self.num_snapshots += 1
            return self.snapshot()
        out, self._records, self._num_pending = self._records, [], 0
        return out

    def snapshot(self) -> list[KVEventRecord]:
        """The cache as events: all_cleared, then every cached hash."""
        records: list[KVEventRecord] = [("all_cleared", [])]
        if self.pool.cached:
            records.append(("stored", list(self.pool.cached)))
        return records


def replay(records: list[KVEventRecord], into: set[BlockHash]) -> set[BlockHash]:
    """Apply records to a set of cached hashes (the consumer's view); returns the set."""
    for kind, hashes in records:
        if kind == "stored":
            into.update(hashes)
        elif kind == "removed":
            into.difference_update(hashes)
        else:
            into.clear()
    return into
