"""`cpu:SIZE`: host-memory tier, strict size bound, LRU eviction.

With the raw codec a block is kept as a contiguous tensor copy (no
serialization; a later version can pin it for fast H2D copies); with any other
codec it is kept as the encoded bytes and decoded on get.

Invariant: used_bytes == sum of entry sizes <= capacity_bytes after every
operation; entry size = tensor nbytes (raw) or len(payload).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TypeAlias

import torch

from kvserve.core.hashing import BlockHash
from kvserve.kv_store.base import KVBlock, KVTier
from kvserve.kv_store.codecs.base import Codec, CodecError
from kvserve.kv_store.namespace import KVNamespace

logger = logging.getLogger(__name__)

_Stored: TypeAlias = torch.Tensor | bytes


class CpuTier(KVTier):
    """Blocks returned by `get` may share memory with the tier: treat them as
    read-only (the engine copies them into its device pool anyway)."""

    scheme = "cpu"

    def __init__(self, namespace: KVNamespace, codec: Codec, capacity_bytes: int) -> None:
        super().__init__(namespace, codec)
        if capacity_bytes <= 0:
            raise ValueError("cpu tier capacity must be positive")
        self._capacity = int(capacity_bytes)
        self._used = 0
        # block hash -> stored block; order = LRU (first) ... MRU (last).
        self._entries: OrderedDict[BlockHash, _Stored] = OrderedDict()
        self._store_tensors = codec.lossless and codec.name == "raw"

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def describe(self) -> str:
        return f"cpu({self._capacity} B, codec={self.codec.identity})"

    @staticmethod
    def _size(stored: _Stored) -> int:
        if isinstance(stored, torch.Tensor):
            return stored.numel() * stored.element_size()
        return len(stored)

    def _decode(self, stored: _Stored) -> KVBlock:
        if isinstance(stored, torch.Tensor):
            return stored
        return self.codec.decode(stored, self.namespace.torch_dtype, self.namespace.block_shape)

    # ----- hooks ------------------------------------------------------------

    def _contains(self, key: BlockHash) -> bool:
        return key in self._entries

    def _get(self, key: BlockHash) -> KVBlock | None:
        stored = self._entries.get(key)
        if stored is None:
            return None
        self._entries.move_to_end(key)
        self._stats.bytes_read += self._size(stored)
        return self._decode(stored)

    def _put(self, key: BlockHash, block: KVBlock) -> None:
        if key in self._entries:
            # Same hash => same tokens and namespace => same KV: just refresh recency.
            self._entries.move_to_end(key)
            return
        stored: _Stored
        try:
            if self._store_tensors:
                stored = block.detach().to("cpu", copy=True).contiguous()
            else:
                stored = self.codec.encode(block)
        except CodecError as e:
            logger.warning("cpu tier: dropping put, encode failed: %s", e)
            self._stats.dropped_puts += 1
            return
        size = self._size(stored)
        if size > self._capacity:
            logger.warning("cpu tier: block of %d B exceeds capacity %d B; dropping put", size, self._capacity)
            self._stats.dropped_puts += 1
            return
        while self._used + size > self._capacity:
            self._evict_lru()
        self._entries[key] = stored
        self._used += size
        self._stats.bytes_written += size

    def _evict_lru(self) -> None:
        key, stored = self._entries.popitem(last=False)
        self._used -= self._size(stored)
        self._stats.evictions += 1
        self._notify_evicted(key, lambda: self._decode(stored))

    def _remove(self, key: BlockHash) -> None:
        stored = self._entries.pop(key, None)
        if stored is not None:
            self._used -= self._size(stored)

    def _clear(self) -> None:
        self._entries.clear()
        self._used = 0

    def _close(self) -> None:
        self._clear()

    def keys_lru_order(self) -> list[BlockHash]:
        """Keys from least to most recently used (for tests and introspection)."""
        with self._lock:
            return list(self._entries)
