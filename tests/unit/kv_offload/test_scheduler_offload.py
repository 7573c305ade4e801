"""Scheduler + KV manager + offload manager on exact state (fake tiers, no torch)."""
from __future__ import annotations

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.kv_offload import KVLoad, KVOffloadManager, KVSave
from kvserve.core.scheduler import ModelRunnerOutput, SampledToken, Scheduler
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams
from tests.unit.kv_offload.fakes import FakeTierClient

BS = 4


def make(num_blocks=16, budget=64, policy="evict", max_seqs=8):
    client = FakeTierClient()
    kv = KVCacheManager(num_blocks, BS, True)
    offload = KVOffloadManager(client, BS, policy)
    s = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=256), kv,
                  offload=offload)
    return s, client


def req(rid, n, start=0, max_tokens=2, arrival=0.0):
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens),
                   arrival_time=arrival, block_size=BS, eos_token_ids=frozenset({999}))


def step(s, token=7):
    out = s.schedule()
    s.kv.check_integrity()
    res = ModelRunnerOutput(sampled={r.request_id: [SampledToken(token)] for r in out.requests if r.sample})
    s.update_from_output(out, res)
    s.kv.check_integrity()
    return out


def plan(out):
    return [(r.request_id, len(r.token_ids), r.start_pos) for r in out.requests]


def test_tier_hit_waits_for_kv_while_others_run_then_loads_before_its_prefill():
    s, c = make()
    a = req("a", 14)  # 3 full blocks + 2 tokens
    c.stored.update(a.block_hashes)
    s.add_request(a)
    s.add_request(req("b", 5, start=100, max_tokens=4, arrival=1.0))
    out = step(s)
    # a left the queue for its load; b was admitted in the same step.
    assert plan(out) == [("b", 5, 0)]
    assert a.status == RequestStatus.WAITING_FOR_KV and s.num_waiting_for_kv == 1
    assert c.submitted == {"a": a.block_hashes[:3]}
    assert s.kv.block_ids("a") == [] and s.has_unfinished()
    out = step(s)  # load not finished: b decodes alone
    assert plan(out) == [("b", 1, 5)] and out.kv_loads == []
    c.finish_load("a")
    out = step(s)
    # a is admitted with 12 tokens from the tier and computes only the last 2.
    assert plan(out) == [("b", 1, 6), ("a", 2, 12)]
    a_blocks = s.kv.block_ids("a")
    assert out.kv_loads == [KVLoad("a", 0, a_blocks[:3])]
    assert a.num_cached_tokens == 12
    # The loaded blocks are promoted into the device prefix cache.
    for h, bid in zip(a.block_hashes[:3], a_blocks[:3]):
        assert s.kv.pool.cached[h].block_id == bid
    assert s.offload.stats.blocks_used == 3


def test_device_hit_plus_tier_hit_and_truncated_load_recomputes_the_rest():
    s, c = make()
    first = req("first", 6)  # computes block 0 on the device
    s.add_request(first)
    while "first" in s.requests:
        step(s)
    r = req("r", 22)  # blocks 0..4 full; block 0 on device, 1..4 in the tier
    c.stored.update(r.block_hashes[1:5])
    s.add_request(r)
    out = step(s)
    assert out.requests == [] and c.submitted == {"r": r.block_hashes[1:5]}
    c.finish_load("r", 2)  # block 3 came back None: only blocks 1, 2 are usable
    out = step(s)
    ids = s.kv.block_ids("r")
    assert out.kv_loads == [KVLoad("r", 0, ids[1:3])]
    assert plan(out) == [("r", 22 - 12, 12)]  # device 4 + tier 8 tokens; the rest recomputed
    assert s.offload.stats.blocks_truncated == 2


def test_evicted_blocks_are_listed_for_saving_in_the_step_that_reuses_them():
    s, _ = make(num_blocks=4)
    a = req("a", 9, max_tokens=1)  # blocks 0,1 full + 1 partial -> 3 blocks
    s.add_request(a)
    step(s)  # a finishes after one token
    assert "a" not in s.requests
    a_ids = {h: s.kv.pool.cached[h].block_id for h in a.block_hashes[:2]}
    b = req("b", 13, start=100)  # needs 4 blocks: reuses both of a's cached ones
    s.add_request(b)
    out = s.schedule()
    # Free queue order: the uncached tail (front), then a's blocks freed tail first.
    assert out.kv_saves == [KVSave(a.block_hashes[1], a_ids[a.block_hashes[1]]),
                            KVSave(a.block_hashes[0], a_ids[a.block_hashes[0]])]
    assert plan(out) == [("b", 13, 0)]


def test_finish_policy_lists_the_finished_requests_full_blocks():
    s, _ = make(policy="finish")
    a = req("a", 10, max_tokens=1)
    s.add_request(a)
    out = step(s)
    assert out.kv_saves == []
    ids = [s.kv.pool.cached[h].block_id for h in a.block_hashes[:2]]
    assert s.offload.pending_saves == [KVSave(a.block_hashes[0], ids[0]), KVSave(a.block_hashes[1], ids[1])]
    out = s.schedule()
    assert out.kv_saves == [KVSave(a.block_hashes[0], ids[0]), KVSave(a.block_hashes[1], ids[1])]


def test_abort_while_waiting_for_kv_cancels_the_load():
    s, c = make()
    a = req("a", 14)
    c.stored.update(a.block_hashes)
    s.add_request(a)
    step(s)
    assert a.status == RequestStatus.WAITING_FOR_KV
    assert s.abort("a").status == RequestStatus.FINISHED_ABORTED
    assert "a" in c.cancelled and not s.has_unfinished()
    c._events.loads["a"] = 3  # the load lands after the abort: ignored
    out = s.schedule()
    assert out.requests == [] and out.kv_loads == [] and out.finished_ids == ["a"]
    s.kv.check_integrity()


def test_device_prefix_evicted_during_the_load_discards_it():
    s, c = make(num_blocks=5)
    first = req("first", 6, max_tokens=1)
    s.add_request(first)
    step(s)  # block 0 of the prompt family now cached on the device
    r = req("r", 14)  # block 0 on device, blocks 1, 2 in the tier
    c.stored.update(r.block_hashes[1:3])
    s.add_request(r)
    step(s)
    assert r.status == RequestStatus.WAITING_FOR_KV
    # Another request takes the whole pool, evicting block 0.
    s.add_request(req("big", 17, start=500, max_tokens=1))
    step(s)
    assert r.block_hashes[0] not in s.kv.pool.cached
    c.finish_load("r")
    out = step(s)
    # The loaded blocks 1, 2 no longer continue a device hit: all recomputed.
    assert out.kv_loads == [] and plan(out) == [("r", 14, 0)]
    assert s.offload.stats.blocks_discarded == 2 and "r" in c.cancelled


def test_returning_request_that_does_not_fit_keeps_its_load_and_its_place():
    s, c = make(num_blocks=5, max_seqs=8)
    r = req("r", 14, arrival=0.0)
    c.stored.update(r.block_hashes)
    s.add_request(r)
    step(s)
    s.add_request(req("hog", 15, start=300, max_tokens=3, arrival=1.0))  # 4 of 5 blocks
    step(s)
    c.finish_load("r")
    out = step(s)  # r needs 4 blocks, only 1 free: it waits at the head with its load
    assert [q.request_id for q in s.waiting] == ["r"] and s.offload.has_ready_load("r")
    assert out.kv_loads == []
    while "hog" in s.requests:
        out = step(s)
    out = step(s)
    assert out.kv_loads == [KVLoad("r", 0, s.kv.block_ids("r")[:3])]
    assert plan(out) == [("r", 2, 12)]


def test_no_lookup_when_the_device_has_the_whole_prefix():
    s, c = make()
    a = req("a", 9, max_tokens=1)
    s.add_request(a)
    step(s)
    c.lookups.clear()
    s.add_request(req("a2", 9))
    out = step(s)
    assert plan(out) == [("a2", 1, 8)] and c.lookups == []


def test_load_covering_the_device_prefix_survives_its_eviction_during_the_wait():
    s, c = make(num_blocks=5)
    first = req("first", 6, max_tokens=1)
    s.add_request(first)
    step(s)
    r = req("r", 14)  # block 0 on the device; blocks 0, 1, 2 all in the tier
    c.stored.update(r.block_hashes[:3])
    s.add_request(r)
    step(s)
    assert c.submitted == {"r": r.block_hashes[:3]}  # the load starts at block 0
    s.add_request(req("big", 17, start=500, max_tokens=1))
    step(s)  # evicts block 0 from the device
    assert r.block_hashes[0] not in s.kv.pool.cached
    c.finish_load("r")
    out = step(s)
    assert out.kv_loads == [KVLoad("r", 0, s.kv.block_ids("r")[:3])]
    assert plan(out) == [("r", 2, 12)]


def test_device_prefix_still_cached_is_not_copied_again():
    s, c = make()
    first = req("first", 6, max_tokens=1)
    s.add_request(first)
    step(s)
    r = req("r", 14)
    c.stored.update(r.block_hashes[:3])
    s.add_request(r)
    step(s)
    c.finish_load("r")
    out = step(s)
    ids = s.kv.block_ids("r")
    assert out.kv_loads == [KVLoad("r", 1, ids[1:3])]  # loaded block 0 skipped: the device has it
    assert ids[0] == s.kv.pool.cached[r.block_hashes[0]].block_id
    st = s.offload.stats
    assert st.blocks_used == 2 and st.blocks_on_device == 1 and st.blocks_discarded == 0
