"""The one interface every KV tier implements, and the stats it keeps.

A *block* crossing this interface is one tensor holding every layer's K and V
for `block_size` tokens:

    KVBlock: [num_layers, 2, block_size, num_kv_heads, head_dim]   (K at [:, 0], V at [:, 1])

in the engine's dtype (float32 / bfloat16 / float16), on the host.  A block's
key is the engine's 32-byte chained block hash (`kvserve.core.hashing`); each
tier mixes its namespace (model, dtype, layout, codec) into the key it stores
under, so callers never see namespaced keys.

Error contract (what the engine may rely on):
  * `get` returns None for a miss, and also for any entry that is corrupt,
    truncated, from another namespace/codec, or unreachable (Redis down).
    Bad entries are dropped and a warning is logged; they are never returned.
  * `put` never raises for storage trouble (disk full, Redis down, ...): the
    put is dropped with a warning and counted in `stats.dropped_puts`.
  * Programming errors (a key that is not 32 bytes, a block of the wrong
    shape/dtype for the namespace) raise ValueError.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence, TypeAlias, runtime_checkable

import torch

from kvserve.core.hashing import BlockHash
from kvserve.kv_store.codecs.base import Codec
from kvserve.kv_store.namespace import KVNamespace

# [num_layers, 2, block_size, num_kv_heads, head_dim], host memory, namespace dtype.
KVBlock: TypeAlias = torch.Tensor

BLOCK_HASH_BYTES = 32

# Called with (block_hash, block) for each entry a tier evicts, while the
# tier still holds it; TieredKVStore uses it to demote blocks one tier down.
EvictionListener = Callable[[BlockHash, KVBlock], None]


@dataclass(slots=True)
class TierStats:
    """Counters for /metrics.  All monotonically increasing; latencies are sums
    in seconds (divide by `gets` / `puts` for a mean)."""

    gets: int = 0              # keys looked up (a get_many of n keys counts n)
    hits: int = 0
    misses: int = 0            # includes corrupt entries and unreachable backends
    puts: int = 0              # keys offered to put (including dropped ones)
    dropped_puts: int = 0      # puts not stored: too large, disk full, backend down, encode failure
    bytes_read: int = 0        # stored (encoded) bytes read on hits
    bytes_written: int = 0     # stored (encoded) bytes written
    get_latency_s: float = 0.0
    put_latency_s: float = 0.0
    evictions: int = 0         # entries removed to respect the size bound
    corrupt: int = 0           # entries found bad (checksum, truncation, namespace/codec) and dropped
    errors: int = 0            # I/O or connection errors

    def snapshot(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def add(self, other: "TierStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@runtime_checkable
class KVStore(Protocol):
    """What the engine talks to: a single tier or a TieredKVStore."""

    def contains(self, key: BlockHash) -> bool: ...
    def get(self, key: BlockHash) -> KVBlock | None: ...
    def put(self, key: BlockHash, block: KVBlock) -> None: ...
    def remove(self, key: BlockHash) -> None: ...
    def close(self) -> None: ...
    def contains_many(self, keys: Sequence[BlockHash]) -> list[bool]: ...
    def get_many(self, keys: Sequence[BlockHash]) -> list[KVBlock | None]: ...
    def put_many(self, items: Iterable[tuple[BlockHash, KVBlock]]) -> None: ...

    @property
    def stats(self) -> TierStats: ...


def check_key(key: BlockHash) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != BLOCK_HASH_BYTES:
        raise ValueError(f"KV block key must be {BLOCK_HASH_BYTES} bytes, got {key!r:.80}")


class KVTier(ABC):
    """Base class of a concrete tier (cpu, disk, redis).

    Public methods validate arguments, take `self._lock`, time the call and
    keep the hit/miss counters; subclasses implement the underscored hooks.
    The lock serializes each tier's operations (index updates and, for
    simplicity, its I/O); different tiers have different locks, and a tier
    only calls *down* the hierarchy (eviction listener), so no lock cycles.
    """

    scheme: str = "?"  # registry scheme, e.g. "cpu"
    # True when entries outlive this process (disk, Redis): the engine then saves
    # blocks by default and flushes its device blocks here on close.
    persistent: bool = False

    def __init__(self, namespace: KVNamespace, codec: Codec) -> None:
        # The namespace a tier keys under always carries the tier's codec, so a
        # block encoded with one codec is simply a miss for a tier using another.
        self.namespace = namespace.with_codec(codec.identity)
        self.codec = codec
        self._stats = TierStats()
        self._lock = threading.RLock()
        self._eviction_listener: EvictionListener | None = None

    # ----- public API -------------------------------------------------------

    @property
    def stats(self) -> TierStats:
        return self._stats

    def set_eviction_listener(self, listener: EvictionListener | None) -> None:
        self._eviction_listener = listener

    def contains(self, key: BlockHash) -> bool:
        check_key(key)
        with self._lock:
            return self._contains(bytes(key))

    def contains_many(self, keys: Sequence[BlockHash]) -> list[bool]:
        for k in keys:
            check_key(k)
        with self._lock:
            return self._contains_many([bytes(k) for k in keys])

    def get(self, key: BlockHash) -> KVBlock | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[BlockHash]) -> list[KVBlock | None]:
        for k in keys:
            check_key(k)
        t0 = time.perf_counter()
        with self._lock:
            out = self._get_many([bytes(k) for k in keys])
            n_hit = sum(b is not None for b in out)
            s = self._stats
            s.gets += len(keys)
            s.hits += n_hit
            s.misses += len(keys) - n_hit
            s.get_latency_s += time.perf_counter() - t0
        return out

    def put(self, key: BlockHash, block: KVBlock) -> None:
        self.put_many([(key, block)])

    def put_many(self, items: Iterable[tuple[BlockHash, KVBlock]]) -> None:
        checked: list[tuple[BlockHash, KVBlock]] = []
        for k, b in items:
            check_key(k)
            self.namespace.check_block(b)
            checked.append((bytes(k), b))
        t0 = time.perf_counter()
        with self._lock:
            self._put_many(checked)
            self._stats.puts += len(checked)
            self._stats.put_latency_s += time.perf_counter() - t0

    def remove(self, key: BlockHash) -> None:
        check_key(key)
        with self._lock:
            self._remove(bytes(key))

    def clear(self) -> None:
        """Drop every entry this tier holds (see each tier for its scope)."""
        with self._lock:
            self._clear()

    def close(self) -> None:
        with self._lock:
            self._close()

    def __enter__(self) -> "KVTier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def capacity_bytes(self) -> int | None:
        """Size bound in stored bytes, or None where the backend bounds itself (Redis)."""
        return None

    @property
    def used_bytes(self) -> int | None:
        return None

    def describe(self) -> str:
        return f"{self.scheme}(codec={self.codec.identity})"

    # ----- hooks ------------------------------------------------------------

    @abstractmethod
    def _contains(self, key: BlockHash) -> bool: ...

    def _contains_many(self, keys: list[BlockHash]) -> list[bool]:
        return [self._contains(k) for k in keys]

    @abstractmethod
    def _get(self, key: BlockHash) -> KVBlock | None:
        """Return the block or None; count bytes_read / corrupt / errors itself."""

    def _get_many(self, keys: list[BlockHash]) -> list[KVBlock | None]:
        return [self._get(k) for k in keys]

    @abstractmethod
    def _put(self, key: BlockHash, block: KVBlock) -> None:
        """Store or drop (counting dropped_puts); never raise for storage trouble."""

    def _put_many(self, items: list[tuple[BlockHash, KVBlock]]) -> None:
        for k, b in items:
            self._put(k, b)

    @abstractmethod
    def _remove(self, key: BlockHash) -> None: ...

    @abstractmethod
    def _clear(self) -> None: ...

    def _close(self) -> None:
        pass

    def _notify_evicted(self, key: BlockHash, load: Callable[[], KVBlock | None]) -> None:
        """Report an evicted entry to the listener; `load` is only called if one is set."""
        listener = self._eviction_listener
        if listener is None:
            return
        block = load()
        if block is not None:
            listener(key, block)
