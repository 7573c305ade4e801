"""The chunk cache on exact state: blocks held for the blend step and released after it,
chunk blocks registered only once computed (never after a failed step), found again at
other positions, evicted from the same LRU as prefix blocks, and KV integrity after
every operation.  Pure Python: the real scheduler and KV manager, no model."""
from __future__ import annotations

from kvserve.blend.chunk_source import ChunkCache, chunk_hashes
from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.scheduler import Scheduler
from kvserve.protocol import ModelRunnerOutput, SampledToken, SchedulerOutput
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams

BS = 4
SEG0 = [1, 2, 3, 4, 5]  # 1 full block + 1 token
DOC_A = [10, 11, 12, 13, 14, 15]  # with the sink: 7 tokens -> 2 chunk blocks (1 full, 1 tail)
DOC_B = [20, 21, 22]  # with the sink: 4 tokens -> 1 full chunk block
QUESTION = [30, 31]


def _setup(num_blocks: int = 32, budget: int = 256):
    kv = KVCacheManager(num_blocks, BS)
    chunks = ChunkCache(kv, ratio=0.5, sink_tokens=1)  # the BOS alone: small exact block counts
    sched = Scheduler(SchedulerConfig(max_model_len=128, max_num_batched_tokens=budget), kv, sources=[chunks])
    return kv, chunks, sched


def _request(rid: str, docs: list[list[int]], ratio: float = 0.5) -> Request:
    segs = [SEG0, *docs, QUESTION]
    return Request(rid, [t for s in segs for t in s], SamplingParams(temperature=0, max_tokens=1),
                   block_size=BS, segment_lens=tuple(len(s) for s in segs), blend_ratio=ratio)


def _finish_step(sched: Scheduler, step: SchedulerOutput) -> None:
    out = ModelRunnerOutput(sampled={r.request_id: [SampledToken(7)] for r in step.requests if r.sample})
    sched.update_from_output(step, out)


def test_chunk_hashes_depend_on_tokens_only():
    a = chunk_hashes([1, *DOC_A], BS, b"m")
    assert len(a) == 2 and a == chunk_hashes([1, *DOC_A], BS, b"m")
    assert chunk_hashes([1, *DOC_A], BS, b"other model") != a
    # Every block is the chunk's own (the root names all its tokens): chunks sharing their
    # first block of tokens (a long sink) never share a hash.
    assert chunk_hashes([1, *DOC_A[:-1]], BS, b"m")[0] != a[0]
    assert not set(chunk_hashes([1, *DOC_B], BS, b"m")) & set(chunk_hashes([1, *DOC_B, 9], BS, b"m"))


def test_miss_then_hit_at_another_position_exact_state():
    kv, chunks, sched = _setup()
    r1 = _request("r1", [DOC_A, DOC_B])
    sched.add_request(r1)
    step = sched.schedule()
    (sr,) = step.requests
    blend = sr.blend
    assert blend is not None and blend.emitted and blend.ratio == 0.5
    assert [(c.dst_start, c.length, c.compute, c.sink) for c in blend.chunks] == [(5, 6, True, [1]), (11, 3, True, [1])]
    a_blocks, b_blocks = blend.chunks[0].src_block_ids, blend.chunks[1].src_block_ids
    assert len(a_blocks) == 2 and len(b_blocks) == 1
    # Held for the step (ref 1 each, not in the free queue), not registered yet.
    pool = kv.pool
    assert all(pool.blocks[b].ref_cnt == 1 and pool.blocks[b].block_hash is None for b in a_blocks + b_blocks)
    assert pool.get_cached_block(chunk_hashes([1, *DOC_A], BS, chunks.namespace)[0]) is None
    kv.check_integrity()
    _finish_step(sched, step)  # max_tokens=1: r1 finishes, its hold ends registering the chunks
    kv.check_integrity()
    for blocks, doc in ((a_blocks, DOC_A), (b_blocks, DOC_B)):
        hashes = chunk_hashes([1, *doc], BS, chunks.namespace)
        assert [pool.get_cached_block(h).block_id for h in hashes] == blocks
        assert all(pool.blocks[b].ref_cnt == 0 and pool.blocks[b].in_free_queue for b in blocks)
    assert (chunks.stats.misses, chunks.stats.hits, chunks.stats.blends) == (2, 0, 1)
    # The documents in the other order: both hit, shared (ref 1 while held), nothing computed.
    r2 = _request("r2", [DOC_B, DOC_A])
    sched.add_request(r2)
    step = sched.schedule()
    blend = step.requests[0].blend
    assert [(c.dst_start, c.compute, c.src_block_ids) for c in blend.chunks] == [(5, False, b_blocks),
                                                                               (8, False, a_blocks)]
    assert all(pool.blocks[b].ref_cnt == 1 for b in a_blocks + b_blocks)
    kv.check_integrity()
    _finish_step(sched, step)
    assert all(pool.blocks[b].ref_cnt == 0 for b in a_blocks + b_blocks)
    assert (chunks.stats.misses, chunks.stats.hits) == (2, 2)
    # 9 chunk tokens at ratio 0.5: ceil(4.5) = 5 recomputed per blend.
    assert chunks.stats.tokens_chunked == 18 and chunks.stats.tokens_recomputed == 10
    kv.check_integrity()


def test_hold_ends_at_the_next_schedule_for_a_running_request():
    kv, chunks, sched = _setup()
    r = Request("r", [t for s in [SEG0, DOC_A, QUESTION] for t in s], SamplingParams(temperature=0, max_tokens=3),
                block_size=BS, segment_lens=(5, 6, 2))
    sched.add_request(r)
    step = sched.schedule()
    held = step.requests[0].blend.chunks[0].src_block_ids
    _finish_step(sched, step)
    assert all(kv.pool.blocks[b].ref_cnt == 1 for b in held)  # still held: no schedule since
    step = sched.schedule()  # the decode step; the blend step has run
    assert step.requests[0].blend is None
    assert all(kv.pool.blocks[b].ref_cnt == 0 and kv.pool.blocks[b].block_hash is not None for b in held)
    kv.check_integrity()


def test_failed_step_registers_nothing():
    kv, chunks, sched = _setup()
    sched.add_request(_request("r", [DOC_A]))
    step = sched.schedule()
    held = step.requests[0].blend.chunks[0].src_block_ids
    sched.finish_request("r", RequestStatus.FINISHED_ERROR)  # what EngineCore does when a step raises
    assert all(kv.pool.blocks[b].ref_cnt == 0 and kv.pool.blocks[b].block_hash is None for b in held)
    assert not kv.pool.cached.keys() & set(chunk_hashes([1, *DOC_A], BS, chunks.namespace))
    kv.check_integrity()


def test_chunked_prefill_falls_back_to_an_exact_prefill():
    kv, chunks, sched = _setup(budget=8)  # 13 prompt tokens do not fit one step
    sched.add_request(_request("r", [DOC_A]))
    step = sched.schedule()
    assert step.requests[0].blend is None and len(step.requests[0].token_ids) == 8
    _finish_step(sched, step)
    sched.schedule()
    assert chunks.stats.fallbacks == 1 and chunks.stats.blends == 0
    assert not kv.pool.cached.keys() & set(chunk_hashes([1, *DOC_A], BS, chunks.namespace))  # never computed
    kv.check_integrity()


def test_chunk_blocks_share_eviction_with_prefix_blocks():
    kv, chunks, sched = _setup(num_blocks=12)
    sched.add_request(_request("r", [DOC_A]))
    _finish_step(sched, sched.schedule())
    sched.schedule()
    a_hashes = chunk_hashes([1, *DOC_A], BS, chunks.namespace)
    assert all(kv.pool.get_cached_block(h) is not None for h in a_hashes)
    # A plain request that needs every block: the LRU evicts chunk and prefix blocks alike.
    big = Request("big", list(range(100, 100 + 4 * 12 - 1)), SamplingParams(max_tokens=1), block_size=BS)
    evicted: list[bytes] = []
    kv.add_evict_listener(lambda h, b: evicted.append(h))
    sched.add_request(big)
    step = sched.schedule()
    assert len(step.requests) == 1 and kv.num_free_blocks == 0
    assert set(a_hashes) <= set(evicted)
    assert all(kv.pool.get_cached_block(h) is None for h in a_hashes)
    kv.check_integrity()
    # Pool short for the chunk blocks: no blend, an ordinary prefill of the whole prompt.
    _finish_step(sched, step)
    sched.schedule()
    kv.check_integrity()


def test_segments_after_the_prefix_hit_only():
    kv, chunks, sched = _setup()
    # A first request caches SEG0 + DOC_A's leading blocks under its (segment) prefix hashes.
    sched.add_request(_request("r1", [DOC_A, DOC_B]))
    _finish_step(sched, sched.schedule())
    # Same prompt again: the prefix cache covers [0, 12) (3 blocks; never the last token),
    # so only DOC_B (at 11) could be placed... it starts before 12: computed as a gap.
    r2 = _request("r2", [DOC_A, DOC_B])
    sched.add_request(r2)
    step = sched.schedule()
    sr = step.requests[0]
    assert sr.start_pos == 12
    assert sr.blend is None  # no document starts at or after the hit
    kv.check_integrity()


def _tier_setup(num_blocks: int = 32):
    from kvserve.core.kv_offload import KVOffloadManager
    from tests.unit.kv_offload.fakes import FakeTierClient

    client = FakeTierClient()
    kv = KVCacheManager(num_blocks, BS)
    offload = KVOffloadManager(client, BS, policy="finish")
    chunks = ChunkCache(kv, ratio=0.5, offload=offload, sink_tokens=1)
    sched = Scheduler(SchedulerConfig(max_model_len=128, max_num_batched_tokens=256), kv, offload=offload,
                      sources=[chunks])
    return kv, chunks, sched, offload, client


def test_chunks_go_down_to_the_tiers_and_come_back_up():
    kv, chunks, sched, offload, client = _tier_setup()
    sched.add_request(_request("r1", [DOC_A, DOC_B]))
    step = sched.schedule()
    assert all(c.compute for c in step.requests[0].blend.chunks)
    _finish_step(sched, step)
    # Under "finish", computed chunks are saved once registered: in the next step's kv_saves.
    a_hashes = chunk_hashes([1, *DOC_A], BS, chunks.namespace)
    b_hashes = chunk_hashes([1, *DOC_B], BS, chunks.namespace)
    step = sched.flush()
    saved = {s.block_hash for s in step.kv_saves}
    assert set(a_hashes + b_hashes) <= saved
    client.confirm_saves(sorted(saved))
    sched.update_from_output(step, ModelRunnerOutput())
    assert kv.pool.reset_prefix_cache()  # the device forgets everything; the tier keeps it
    # Another order: both documents are in the tier, so the request waits for their load.
    r2 = _request("r2", [DOC_B, DOC_A])
    sched.add_request(r2)
    step = sched.schedule()
    assert step.requests == [] and r2.status == RequestStatus.WAITING_FOR_KV
    assert client.submitted["r2\x00chunks"] == b_hashes + a_hashes  # document order of r2
    client.finish_load("r2\x00chunks")
    sched.schedule()  # the tiers' poll folds the load in; the chunk cache sees it next time
    step = sched.schedule()
    # Back in the queue, the offload tiers (asked after the chunk cache) fetch r2's own
    # prefix block (SEG0's, saved when r1 finished): the chunk load stays ready meanwhile.
    assert step.requests == [] and list(client.submitted) == ["r2"]
    client.finish_load("r2")
    step = sched.schedule()
    (sr,) = step.requests
    assert sr.start_pos == 4  # SEG0's full block from the tier
    assert [(c.dst_start, c.compute) for c in sr.blend.chunks] == [(5, False), (8, False)]
    (load,) = [x for x in step.kv_loads if x.request_id == "r2\x00chunks"]
    assert load.first == 0 and load.block_ids == sr.blend.chunks[0].src_block_ids + sr.blend.chunks[1].src_block_ids
    assert (chunks.stats.hits, chunks.stats.tier_hits, chunks.stats.misses) == (2, 2, 2)
    kv.check_integrity()
    _finish_step(sched, step)
    # Loaded chunks are registered after the step, like computed ones.
    assert kv.pool.get_cached_block(a_hashes[0]).block_id == sr.blend.chunks[1].src_block_ids[0]
    assert all(kv.pool.blocks[b].ref_cnt == 0 for c in sr.blend.chunks for b in c.src_block_ids)
    kv.check_integrity()


def test_a_partial_tier_load_computes_the_rest():
    kv, chunks, sched, offload, client = _tier_setup()
    a_hashes = chunk_hashes([1, *DOC_A], BS, chunks.namespace)
    b_hashes = chunk_hashes([1, *DOC_B], BS, chunks.namespace)
    client.stored.update(a_hashes + b_hashes)
    sched.add_request(_request("r", [DOC_A, DOC_B]))
    sched.schedule()
    client.finish_load("r\x00chunks", num_loaded=2)  # DOC_A (2 blocks) whole, DOC_B's block missing
    sched.schedule()
    step = sched.schedule()
    blend = step.requests[0].blend
    assert [c.compute for c in blend.chunks] == [False, True]
    assert (chunks.stats.tier_hits, chunks.stats.misses) == (1, 1)
    kv.check_integrity()
