"""Exact-state tests of the KV cache manager, with check_integrity after every operation."""
from __future__ import annotations

from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), block_size=BS)


def admit(m: KVCacheManager, r: Request, n: int | None = None):
    blocks, cached = m.get_computed_blocks(r)
    r.num_computed_tokens = cached
    n = r.num_tokens - cached if n is None else n
    new = m.allocate_slots(r, n, blocks)
    m.check_integrity()
    if new is not None:
        r.num_computed_tokens += n
    return blocks, cached, new


def test_allocation_and_prefix_hit_exact_blocks():
    m = KVCacheManager(num_blocks=10, block_size=BS)
    a = req("a", list(range(10)))  # 2 full blocks + 2 tokens
    _, cached, new = admit(m, a)
    assert cached == 0 and [b.block_id for b in new] == [0, 1, 2]
    assert m.block_ids("a") == [0, 1, 2]
    # Same first 8 tokens: both full blocks hit.
    b = req("b", list(range(8)) + [99, 98, 97])
    blocks, cached, new = admit(m, b)
    assert cached == 8 and [x.block_id for x in blocks] == [0, 1]
    assert [x.block_id for x in new] == [3]
    assert m.pool.blocks[0].ref_cnt == 2 and m.pool.blocks[1].ref_cnt == 2


def test_last_token_is_never_served_from_cache():
    m = KVCacheManager(num_blocks=10, block_size=BS)
    a = req("a", list(range(8)))
    admit(m, a)
    m.free(a)
    m.check_integrity()
    b = req("b", list(range(8)))  # identical, exactly 2 blocks
    blocks, cached, new = admit(m, b)
    assert cached == 4, "only the first block may hit: the last token must be computed"
    assert [x.block_id for x in blocks] == [0]


def test_freed_blocks_stay_cached_and_evict_lru_tail_first():
    m = KVCacheManager(num_blocks=4, block_size=BS)
    a = req("a", list(range(9)))  # blocks 0,1 full, 2 partial
    admit(m, a)
    m.free(a)
    m.check_integrity()
    # Free order is reversed, and the partial block (uncached) goes to the head.
    assert [b.block_id for b in m.pool.free_queue] == [2, 3, 1, 0]
    c = req("c", [50] * 9)
    admit(m, c)  # needs 3 blocks: takes 2, 3, then evicts 1 (a's second block)
    assert m.block_ids("c") == [2, 3, 1]
    d = req("d", list(range(4)) + [7])
    _, cached, _ = admit(m, d)
    assert cached == 4  # a's first block survived


def test_allocate_fails_atomically_when_short():
    m = KVCacheManager(num_blocks=3, block_size=BS)
    a = req("a", list(range(8)))
    admit(m, a)
    b = req("b", list(range(100, 112)))
    _, _, new = admit(m, b)
    assert new is None
    assert "b" not in m.req_blocks or m.req_blocks["b"] == []
    assert m.num_free_blocks == 1


def test_incremental_decode_allocation_and_caching():
    m = KVCacheManager(num_blocks=8, block_size=BS)
    a = req("a", [1, 2, 3])
    admit(m, a)
    for tok in [4, 5, 6]:
        a.append_output_token(tok)
        new = m.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        m.check_integrity()
    assert m.block_ids("a") == [0, 1]
    # The first block became full when token 4 was scheduled and is cached now.
    assert m.pool.blocks[0].block_hash == a.block_hashes[0]


def test_fork_shares_full_prompt_blocks_only():
    m = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    parent = req("p#0", list(range(10)))
    admit(m, parent)
    child = req("p#1", list(range(10)))
    shared = m.fork(parent, child)
    m.check_integrity()
    assert shared == 8
    assert m.block_ids("p#1") == [0, 1]
    assert m.pool.blocks[0].ref_cnt == 2 and m.pool.blocks[2].ref_cnt == 1
    # A prompt that is an exact multiple of the block size leaves its last block unshared.
    p2 = req("q#0", list(range(8)))
    admit(m, p2)
    c2 = req("q#1", list(range(8)))
    assert m.fork(p2, c2) == 4
    m.check_integrity()
    m.free(parent)
    m.free(child)
    m.free(p2)
    m.free(c2)
    m.check_integrity()
    assert m.num_free_blocks == 8


def test_prefix_caching_disabled_never_hits():
    m = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = req("a", list(range(9)))
    admit(m, a)
    b = req("b", list(range(9)))
    _, cached, _ = admit(m, b)
    assert cached == 0
