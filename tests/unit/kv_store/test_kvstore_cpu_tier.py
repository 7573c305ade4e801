"""Host-memory tier: exact LRU order, strict size bound, stats."""
from __future__ import annotations

import pytest
import torch

from kvserve.kv_store import CpuTier, KVNamespace, get_codec
from tests.unit.kv_store.kvstore_helpers import key, make_block, make_ns


def make_tier(ns: KVNamespace, blocks: int, codec: str = "raw") -> CpuTier:
    return CpuTier(ns, get_codec(codec), capacity_bytes=blocks * ns.block_nbytes)


def test_roundtrip_miss_and_stats(ns: KVNamespace) -> None:
    tier = make_tier(ns, 4)
    b = make_block(ns, 1)
    assert tier.get(key(1)) is None
    tier.put(key(1), b)
    assert tier.contains(key(1)) and not tier.contains(key(2))
    got = tier.get(key(1))
    assert got is not None and torch.equal(got, b)
    s = tier.stats
    assert (s.gets, s.hits, s.misses, s.puts) == (2, 1, 1, 1)
    assert s.bytes_written == ns.block_nbytes == s.bytes_read
    assert s.get_latency_s > 0 and s.put_latency_s > 0


def test_put_stores_a_copy(ns: KVNamespace) -> None:
    tier = make_tier(ns, 2)
    b = make_block(ns, 1)
    tier.put(key(1), b)
    b.zero_()
    got = tier.get(key(1))
    assert got is not None and torch.equal(got, make_block(ns, 1))


def test_lru_eviction_order_and_strict_bound(ns: KVNamespace) -> None:
    tier = make_tier(ns, 3)
    for i in range(3):
        tier.put(key(i), make_block(ns, i))
    assert tier.get(key(0)) is not None          # 0 becomes most recent: order 1, 2, 0
    tier.put(key(1), make_block(ns, 1))          # re-put refreshes recency: order 2, 0, 1
    assert tier.keys_lru_order() == [key(2), key(0), key(1)]
    tier.put(key(3), make_block(ns, 3))          # evicts 2
    assert tier.keys_lru_order() == [key(0), key(1), key(3)]
    tier.put(key(4), make_block(ns, 4))          # evicts 0
    assert tier.keys_lru_order() == [key(1), key(3), key(4)]
    assert not tier.contains(key(2)) and not tier.contains(key(0))
    assert tier.stats.evictions == 2
    assert tier.used_bytes == 3 * ns.block_nbytes == tier.capacity_bytes
    assert len(tier) == 3


def test_capacity_not_a_multiple_of_block_size(ns: KVNamespace) -> None:
    tier = CpuTier(ns, get_codec("raw"), capacity_bytes=int(2.5 * ns.block_nbytes))
    for i in range(10):
        tier.put(key(i), make_block(ns, i))
        assert tier.used_bytes <= tier.capacity_bytes
    assert len(tier) == 2 and tier.keys_lru_order() == [key(8), key(9)]


def test_oversized_block_is_dropped_not_raised(ns: KVNamespace) -> None:
    tier = CpuTier(ns, get_codec("raw"), capacity_bytes=ns.block_nbytes - 1)
    tier.put(key(1), make_block(ns))
    assert tier.get(key(1)) is None and tier.stats.dropped_puts == 1 and tier.used_bytes == 0


def test_encoded_codec_in_memory() -> None:
    ns = make_ns(torch.bfloat16, num_layers=3, block_size=16, head_dim=32)
    tier = make_tier(ns, 4, codec="int8")
    b = make_block(ns, 3)
    tier.put(key(1), b)
    assert tier.used_bytes < ns.block_nbytes       # stored encoded (~half of bf16)
    got = tier.get(key(1))
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == b.shape
    assert float((got.float() - b.float()).abs().max()) < 0.05 * float(b.float().abs().max())
    # fits 4 raw blocks' worth of bytes -> more than 4 encoded blocks
    for i in range(2, 8):
        tier.put(key(i), make_block(ns, i))
    assert len(tier) > 4 and tier.used_bytes <= tier.capacity_bytes


def test_remove_clear_and_argument_errors(ns: KVNamespace) -> None:
    tier = make_tier(ns, 4)
    tier.put(key(1), make_block(ns))
    tier.put(key(2), make_block(ns))
    tier.remove(key(1))
    tier.remove(key(9))  # absent: no-op
    assert not tier.contains(key(1)) and tier.used_bytes == ns.block_nbytes
    tier.clear()
    assert len(tier) == 0 and tier.used_bytes == 0
    with pytest.raises(ValueError):
        tier.put(b"short", make_block(ns))
    with pytest.raises(ValueError):
        tier.put(key(1), make_block(ns).half())
    with pytest.raises(ValueError):
        tier.get("not bytes")  # type: ignore[arg-type]


def test_batch_api(ns: KVNamespace) -> None:
    tier = make_tier(ns, 8)
    tier.put_many([(key(i), make_block(ns, i)) for i in range(3)])
    assert tier.contains_many([key(0), key(5), key(2)]) == [True, False, True]
    got = tier.get_many([key(2), key(7), key(0)])
    assert got[1] is None and got[0] is not None and got[2] is not None
    assert torch.equal(got[0], make_block(ns, 2)) and torch.equal(got[2], make_block(ns, 0))
    assert (tier.stats.hits, tier.stats.misses) == (2, 1)


def test_eviction_listener_receives_the_evicted_block(ns: KVNamespace) -> None:
    tier = make_tier(ns, 2)
    evicted: list[tuple[bytes, torch.Tensor]] = []
    tier.set_eviction_listener(lambda k, b: evicted.append((k, b)))
    for i in range(4):
        tier.put(key(i), make_block(ns, i))
    assert [k for k, _ in evicted] == [key(0), key(1)]
    assert torch.equal(evicted[0][1], make_block(ns, 0))
