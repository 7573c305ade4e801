"""TieredKVStore: an ordered list of tiers behind the same interface.

get:  search tiers top-down (batched per tier); a hit in tier i is promoted
      (copied) into the tiers above it so the next lookup is cheaper.
put:  by `write_policy`:
      * "write_through": write every tier.  Lower tiers hold a superset over
        time (bounded by their own size), so a restart of the process still
        finds blocks on disk / in Redis.  Costs a lower-tier write per put.
      * "demote": write the top tier only; each tier's LRU evictions are
        put into the tier below (CacheLib/LMCache-style), so slower tiers
        are written only when the faster one overflows.  Promotion copies
        into the top tier only.
The store does not know tier types: it only uses the KVTier interface and
the eviction listener hook.
"""
from __future__ import annotations

import threading
import time
from enum import Enum
from typing import Iterable, Sequence

from kvserve.core.hashing import BlockHash
from kvserve.kv_store.base import KVBlock, KVTier, TierStats


class WritePolicy(str, Enum):
    WRITE_THROUGH = "write_through"
    DEMOTE = "demote"


class TieredKVStore:
    def __init__(
        self,
        tiers: Sequence[KVTier],
        write_policy: WritePolicy | str = WritePolicy.WRITE_THROUGH,
        promote: bool = True,
    ) -> None:
        if not tiers:
            raise ValueError("TieredKVStore needs at least one tier")
        self.tiers: list[KVTier] = list(tiers)
        self.write_policy = WritePolicy(write_policy)
        self.promote = promote
        self._stats = TierStats()          # the engine's view: one get = one lookup in the store
        self.hits_by_tier = [0] * len(self.tiers)
        self.promotions = 0
        self.demotions = 0
        self._lock = threading.Lock()      # protects the counters above only
        if self.write_policy is WritePolicy.DEMOTE:
            for upper, lower in zip(self.tiers, self.tiers[1:]):
                upper.set_eviction_listener(self._demoter(lower))

    def _demoter(self, lower: KVTier):  # type: ignore[no-untyped-def]
        def demote(key: BlockHash, block: KVBlock) -> None:
            if not lower.contains(key):
                lower.put(key, block)
                with self._lock:
                    self.demotions += 1
        return demote

    # ----- lookups ----------------------------------------------------------

    @property
    def stats(self) -> TierStats:
        return self._stats

    def tier_stats(self) -> dict[str, TierStats]:
        """Per-tier counters keyed "<level>:<scheme>", e.g. "0:cpu", "1:disk"."""
        return {f"{i}:{t.scheme}": t.stats for i, t in enumerate(self.tiers)}

    def contains(self, key: BlockHash) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[BlockHash]) -> list[bool]:
        found = [False] * len(keys)
        todo = list(range(len(keys)))
        for tier in self.tiers:
            if not todo:
                break
            res = tier.contains_many([keys[i] for i in todo])
            for i, hit in zip(todo, res):
                found[i] = hit
            todo = [i for i, hit in zip(todo, res) if not hit]
        return found

    def longest_prefix(self, keys: Sequence[BlockHash]) -> int:
        """How many leading blocks of a hash chain some tier holds (a hint:
        an entry may still be evicted or found corrupt before `get`)."""
        n = 0
        for hit in self.contains_many(keys):
            if not hit:
                break
            n += 1
        return n

    def get(self, key: BlockHash) -> KVBlock | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[BlockHash]) -> list[KVBlock | None]:
        t0 = time.perf_counter()
        out: list[KVBlock | None] = [None] * len(keys)
        level_of: dict[int, int] = {}
        todo = list(range(len(keys)))
        for level, tier in enumerate(self.tiers):
            if not todo:
                break
            res = tier.get_many([keys[i] for i in todo])
            still: list[int] = []
            for i, block in zip(todo, res):
                if block is None:
                    still.append(i)
                else:
                    out[i] = block
                    level_of[i] = level
            todo = still
        if self.promote:
            self._promote(keys, out, level_of)
        with self._lock:
            s = self._stats
            s.gets += len(keys)
            s.hits += len(level_of)
            s.misses += len(keys) - len(level_of)
            for level in level_of.values():
                self.hits_by_tier[level] += 1
            s.get_latency_s += time.perf_counter() - t0
        return out

    def _promote(self, keys: Sequence[BlockHash], out: list[KVBlock | None], level_of: dict[int, int]) -> None:
        top_only = self.write_policy is WritePolicy.DEMOTE
        n = 0
        for j, upper in enumerate(self.tiers[:1] if top_only else self.tiers[:-1]):
            items = [(keys[i], out[i]) for i, lv in level_of.items() if lv > j]
            if items:
                upper.put_many(items)  # type: ignore[arg-type]
                n += len(items)
        if n:
            with self._lock:
                self.promotions += n

    # ----- writes -----------------------------------------------------------

    def put(self, key: BlockHash, block: KVBlock) -> None:
        self.put_many([(key, block)])

    def put_many(self, items: Iterable[tuple[BlockHash, KVBlock]]) -> None:
        items = list(items)
        t0 = time.perf_counter()
        targets = self.tiers if self.write_policy is WritePolicy.WRITE_THROUGH else self.tiers[:1]
        for tier in targets:
            tier.put_many(items)
        with self._lock:
            self._stats.puts += len(items)
            self._stats.put_latency_s += time.perf_counter() - t0

    @property
    def persistent_tiers(self) -> list[KVTier]:
        """Tiers whose entries outlive the process (disk, Redis)."""
        return [t for t in self.tiers if t.persistent]

    def persist_many(self, items: Iterable[tuple[BlockHash, KVBlock]]) -> None:
        """Write to every persistent tier only, whatever the write policy (the engine's
        flush on close: memory tiers die with the process, and under "demote" a put
        would stop at the top tier)."""
        items = list(items)
        t0 = time.perf_counter()
        for tier in self.persistent_tiers:
            tier.put_many(items)
        with self._lock:
            self._stats.puts += len(items)
            self._stats.put_latency_s += time.perf_counter() - t0

    def remove(self, key: BlockHash) -> None:
        for tier in self.tiers:
            tier.remove(key)

    def clear(self) -> None:
        for tier in self.tiers:
            tier.clear()

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> "TieredKVStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        return " -> ".join(t.describe() for t in self.tiers) + f" [{self.write_policy.value}]"
