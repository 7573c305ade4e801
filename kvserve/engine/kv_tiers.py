"""KVTiers: one engine's KV offload, assembled from a KVTierConfig.

    store    kv_store hierarchy (cpu / disk / redis), namespaced by model weights,
             KV dtype, layout and codec; keyed by the engine's chained block hashes
    io       KVTierIO: background loader and saver threads, driven by the executor only
    steps    StepTierClient: the manager's client; loads leave in the steps
             (kv_fetches / kv_cancels) and come back in their outputs; its one call
             into the tiers is `lookup`, a read of the store's index
    manager  KVOffloadManager: the scheduler-side policy (what to save / load)
    transfer KVTransfer: device <-> host block copies and load requests, run by the
             model runner (attach)

and `stats()` for /metrics.  EngineCore owns one of these when tiers are configured.

Offload policy "auto" (the default) resolves here, once the tiers are known:
"finish" when some tier is persistent (disk, Redis: a restarted or a second
engine should find what this one computed), "evict" for memory-only tiers
(whose contents die with the process, so only what the device pool drops is
worth copying).  On close, blocks still cached in the device pool that no
tier is known to hold are written to the persistent tiers (`persist_cached`),
whatever the policy.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from kvserve.config import KVTierConfig
from kvserve.core.hashing import BlockHash
from kvserve.core.kv_offload import KVOffloadManager, OffloadPolicy, StepTierClient
from kvserve.engine.kv_tier_io import KVTierIO
from kvserve.models.model_config import ModelArchConfig
from kvserve.worker.kv_transfer import KVTransfer, gather_blocks

logger = logging.getLogger(__name__)

# Hint-set size for a tier without a byte bound (Redis bounds itself).
_UNBOUNDED_TIER_BLOCKS = 1 << 16
# The flush on close copies out at most this share of the saver's pending-bytes bound at a time.
_FLUSH_BATCH_SHARE = 4


def resolve_offload_policy(policy: str, persistent: bool) -> OffloadPolicy:
    """"auto" -> "finish" with a persistent tier, else "evict"; other values as given."""
    if policy == "auto":
        return OffloadPolicy.FINISH if persistent else OffloadPolicy.EVICT
    return OffloadPolicy.parse(policy)


class KVTiers:
    def __init__(self, config: KVTierConfig, model_dir: str, arch: ModelArchConfig, dtype: torch.dtype,
                 block_size: int) -> None:
        from kvserve.kv_store import KVNamespace, build_kv_store, model_fingerprint

        self.config = config
        self.namespace = KVNamespace.create(
            model_id=model_fingerprint(model_dir), dtype=dtype, num_layers=arch.num_layers,
            num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim, block_size=block_size,
        )
        assert config.tiers
        self.store = build_kv_store(config.tiers, self.namespace, codec=config.codec,
                                    write_policy=config.write_policy)
        self.persistent = bool(self.store.persistent_tiers)
        self.policy = resolve_offload_policy(config.offload_policy, self.persistent)
        self.io = KVTierIO(self.store, config.max_pending_save_bytes)
        self.steps = StepTierClient(lookup=self.io.lookup)
        self.manager = KVOffloadManager(self.steps, block_size, self.policy,
                                        known_capacity=self._hint_capacity(),
                                        min_load_blocks=config.min_load_blocks)
        self.transfer: KVTransfer | None = None
        self.blocks_flushed_on_close = 0
        logger.info("KV tiers: %s, offload policy %s%s", self.store.describe(), self.policy.value,
                    " (auto)" if config.offload_policy == "auto" else "")

    def _hint_capacity(self) -> int:
        """Blocks the largest tier can hold at raw size: encoded entries are smaller, so
        the "most likely stored" hint set never outgrows what the tiers keep."""
        raw = self.namespace.block_nbytes
        caps = [t.capacity_bytes // raw if t.capacity_bytes is not None else _UNBOUNDED_TIER_BLOCKS
                for t in self.store.tiers]
        return max(caps)

    def attach(self, kv_caches: Sequence[torch.Tensor]) -> KVTransfer:
        """The executor's side of the tiers for this device pool: it applies the steps'
        saves, loads and fetches through it (the runner's `kv_transfer`)."""
        self.transfer = KVTransfer(kv_caches, self.io)
        return self.transfer

    def persist_cached(self, cached: Iterable[tuple[BlockHash, int]], timeout: float) -> int:
        """Write device blocks (hash, block id) that no tier is known to hold to the
        persistent tiers, waiting for room in the saver instead of dropping; returns
        how many were handed to the saver within `timeout` s.

        Only for blocks whose KV is written (every registered block once the last
        step completed).  Without a persistent tier, nothing to do."""
        if not self.persistent or self.transfer is None or self.io.closed:
            return 0
        todo = self.manager.unsaved(cached)
        if not todo:
            return 0
        block_bytes = self.namespace.block_nbytes
        batch = max(1, self.config.max_pending_save_bytes // _FLUSH_BATCH_SHARE // block_bytes)
        deadline = time.monotonic() + timeout
        logger.info("KV tiers: writing %d device blocks (%.1f MiB) to the persistent tiers",
                    len(todo), len(todo) * block_bytes / 2**20)
        sent = 0
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            if not self.io.wait_for_room(len(chunk) * block_bytes, max(0.0, deadline - time.monotonic())):
                logger.warning("KV tiers: %d device blocks not written (flush timed out after %.0f s)",
                               len(todo) - sent, timeout)
                break
            host = gather_blocks(self.transfer.kv_caches, [s.block_id for s in chunk])
            self.io.submit_saves([(s.block_hash, host[j]) for j, s in enumerate(chunk)], persist=True)
            sent += len(chunk)
        self.blocks_flushed_on_close += sent
        return sent

    def stats(self) -> dict[str, Any]:
        """Per-tier hits, bytes and latencies, plus the engine's load/save counters.

        tiers: "<level>:<scheme>" -> TierStats fields (gets, hits, misses, puts, dropped_puts,
               bytes_read, bytes_written, get_latency_s, put_latency_s, evictions, corrupt,
               errors) plus used_bytes / capacity_bytes (None for Redis) and the level's
               hits as seen by the store (`store_hits`: lookups answered by this tier).
        store: the hierarchy's own TierStats (one get = one block lookup), promotions, demotions.
        offload: scheduler-side counters (lookups, blocks loaded/used/truncated, saves ...).
        io: background thread counters (load_wall_s is submit -> ready, summed).
        """
        tiers: dict[str, Any] = {}
        for level, (name, ts) in enumerate(self.store.tier_stats().items()):
            tier = self.store.tiers[level]
            d: dict[str, Any] = dict(ts.snapshot())
            d["used_bytes"] = tier.used_bytes
            d["capacity_bytes"] = tier.capacity_bytes
            d["codec"] = tier.codec.identity
            d["store_hits"] = self.store.hits_by_tier[level]
            tiers[name] = d
        store = dict(self.store.stats.snapshot())
        store["promotions"] = self.store.promotions
        store["demotions"] = self.store.demotions
        io = self.io.stats
        return {
            "spec": self.config.tiers,
            "codec": self.config.codec,
            "offload_policy": self.policy.value,
            "write_policy": self.config.write_policy,
            "tiers": tiers,
            "store": store,
            "offload": self.manager.stats.snapshot(),
            "io": {"loads": io.loads, "blocks_loaded": io.blocks_loaded, "load_wall_s": io.load_wall_s,
                   "saves": io.saves, "save_wall_s": io.save_wall_s, "saves_dropped": io.saves_dropped,
                   "saves_abandoned": io.saves_abandoned, "blocks_flushed_on_close": self.blocks_flushed_on_close,
                   "errors": io.errors},
        }

    def close(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) for queued saves, stop the I/O threads, close the
        store; True when every queued save was written.  Idempotent."""
        return self.io.close(timeout)
