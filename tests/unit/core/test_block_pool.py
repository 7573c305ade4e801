"""Exact-state tests of the block pool: free-queue order, ref counts, lazy eviction."""
from __future__ import annotations

import pytest

from kvserve.core.block_pool import BlockPool
from kvserve.core.hashing import hash_block, hash_block_tokens


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_queue]


def test_allocate_pops_from_head_and_free_appends_to_tail():
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert [b.block_id for b in a] == [0, 1]
    assert free_ids(pool) == [2, 3]
    assert all(b.ref_cnt == 1 for b in a)
    # Cached blocks go to the tail (LRU order) ...
    pool.cache_block(a[0], b"h0")
    pool.cache_block(a[1], b"h1")
    pool.free(reversed(a))
    assert free_ids(pool) == [2, 3, 1, 0]
    pool.check_integrity()


def test_uncached_blocks_are_reused_before_cached_ones():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"ha")
    pool.free([a])
    pool.free([b])  # uncached: goes to the head
    assert free_ids(pool) == [1, 2, 0]
    pool.check_integrity()


def test_lazy_eviction_drops_hash_on_reuse_and_calls_hook():
    pool = BlockPool(2)
    evicted = []
    pool.on_evict = lambda h, bid: evicted.append((h, bid))
    (a,) = pool.allocate(1)
    pool.cache_block(a, b"ha")
    pool.free([a])
    assert pool.get_cached_block(b"ha") is a  # still findable while free
    x, y = pool.allocate(2)  # block 1 first, then the cached block 0 is evicted
    assert (x.block_id, y.block_id) == (1, 0)
    assert pool.get_cached_block(b"ha") is None
    assert evicted == [(b"ha", 0)]
    assert pool.num_evictions == 1
    pool.check_integrity()


def test_touch_removes_free_cached_block_from_queue_in_o1():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.cache_block(b, bytes([i]))
    pool.free(blocks)
    assert free_ids(pool) == [0, 1, 2]
    pool.touch([blocks[1]])  # a cache hit on a free block
    assert free_ids(pool) == [0, 2]
    assert blocks[1].ref_cnt == 1
    pool.touch([blocks[1]])
    assert blocks[1].ref_cnt == 2
    pool.free([blocks[1]])
    assert free_ids(pool) == [0, 2]
    pool.free([blocks[1]])
    assert free_ids(pool) == [0, 2, 1]
    pool.check_integrity()


def test_double_free_and_overallocation_are_refused():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.free([a])
    with pytest.raises(AssertionError):
        pool.free([a])
    with pytest.raises(ValueError):
        pool.allocate(3)


def test_first_writer_wins_for_duplicate_hashes():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"same")
    pool.cache_block(b, b"same")
    assert pool.get_cached_block(b"same") is a
    assert b.block_hash is None
    pool.check_integrity()


def test_caching_disabled_never_indexes():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache_block(a, b"h")
    assert pool.get_cached_block(b"h") is None


def test_chained_hashes_depend_on_every_earlier_block():
    x = hash_block_tokens([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(x) == 3  # the partial tail has no hash
    y = hash_block_tokens([9, 2, 3, 4, 5, 6], 2)
    assert x[0] != y[0] and x[1] != y[1] and x[2] != y[2]  # a change in block 0 propagates
    assert x[1] == hash_block(x[0], [3, 4])
    assert hash_block(None, [1, 2], b"model-a") != hash_block(None, [1, 2], b"model-b")
