"""KVTiers: one engine's KV offload, assembled from a KVTierConfig.

    store    kv_store hierarchy (cpu / disk / redis), namespaced by model weights,
             KV dtype, layout and codec; keyed by the engine's chained block hashes
    io       KVTierIO: background loader and saver threads
    manager  KVOffloadManager: the scheduler-side policy (what to save / load)
    transfer KVTransfer: device <-> host block copies, run by the model runner

and `stats()` for /metrics.  EngineCore owns one of these when tiers are configured.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from kvserve.config import KVTierConfig
from kvserve.core.kv_offload import KVOffloadManager
from kvserve.engine.kv_tier_io import KVTierIO
from kvserve.models.model_config import ModelArchConfig
from kvserve.worker.kv_transfer import KVTransfer

logger = logging.getLogger(__name__)

# Hint-set size for a tier without a byte bound (Redis bounds itself).
_UNBOUNDED_TIER_BLOCKS = 1 << 16


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
        self.io = KVTierIO(self.store, config.max_pending_save_bytes)
        self.manager = KVOffloadManager(self.io, block_size, config.offload_policy,
                                        known_capacity=self._hint_capacity(),
                                        min_load_blocks=config.min_load_blocks)
        self.transfer: KVTransfer | None = None
        logger.info("KV tiers: %s, offload policy %s", self.store.describe(), config.offload_policy)

    def _hint_capacity(self) -> int:
        """Blocks the largest tier can hold at raw size: encoded entries are smaller, so
        the "most likely stored" hint set never outgrows what the tiers keep."""
        raw = self.namespace.block_nbytes
        caps = [t.capacity_bytes // raw if t.capacity_bytes is not None else _UNBOUNDED_TIER_BLOCKS
                for t in self.store.tiers]
        return max(caps)

    def attach(self, kv_caches: Sequence[torch.Tensor]) -> KVTransfer:
        self.transfer = KVTransfer(kv_caches, self.io)
        return self.transfer

    def flush_saves(self) -> int:
        """Copy out saves queued since the last step (e.g. blocks of requests that
        just finished) and hand them to the saver; returns how many."""
        saves = self.manager.take_pending_saves()
        if saves and self.transfer is not None:
            self.transfer.save(saves)
        return len(saves)

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
            "offload_policy": self.config.offload_policy,
            "write_policy": self.config.write_policy,
            "tiers": tiers,
            "store": store,
            "offload": self.manager.stats.snapshot(),
            "io": {"loads": io.loads, "blocks_loaded": io.blocks_loaded, "load_wall_s": io.load_wall_s,
                   "saves": io.saves, "save_wall_s": io.save_wall_s, "saves_dropped": io.saves_dropped,
                   "errors": io.errors},
        }

    def close(self) -> None:
        self.io.close()
