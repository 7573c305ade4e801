"""KVOffloadManager on exact state: which hashes are saved, which are loaded, and when."""
from __future__ import annotations

import pytest

from kvserve.core.kv_offload import KVOffloadManager, KVSave, OffloadPolicy
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams
from tests.unit.kv_offload.fakes import FakeTierClient

BS = 4


def req(rid: str, n: int, start: int = 0) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=4), block_size=BS)


def make(policy: str = "evict", known: int = 100, min_load: int = 1) -> tuple[KVOffloadManager, FakeTierClient]:
    client = FakeTierClient()
    return KVOffloadManager(client, BS, policy, known_capacity=known, min_load_blocks=min_load), client


def test_policy_parse_rejects_unknown():
    assert OffloadPolicy.parse("finish") is OffloadPolicy.FINISH
    with pytest.raises(ValueError, match="kv_offload_policy"):
        OffloadPolicy.parse("lru")


def test_plan_load_starts_after_device_hit_and_never_takes_the_last_token():
    m, c = make()
    r = req("a", 13)  # 3 full blocks; the 13th token sits in a 4th, partial block
    c.stored.update(r.block_hashes[1:])
    assert m.plan_load(r, 1) == (1, r.block_hashes[1:3])
    # The tier hit is counted after the device hit; then the tier is asked about
    # the device prefix (it does not hold it here).
    assert c.lookups == [r.block_hashes[1:3], r.block_hashes[:1]]
    # With exactly 12 tokens the third block holds the last token: it is never planned.
    r12 = req("b", 12, start=100)
    c.stored.update(r12.block_hashes)
    assert m.plan_load(r12, 0) == (0, r12.block_hashes[:2])
    assert m.stats.lookups == 2 and m.stats.lookup_hit_blocks == 4


def test_load_covers_the_device_prefix_when_a_tier_holds_it_and_it_is_not_longer():
    m, c = make()
    r = req("a", 21)  # 5 full blocks
    c.stored.update(r.block_hashes)
    assert m.plan_load(r, 2) == (0, r.block_hashes[:5])  # device 2 <= tier 3: covered
    assert m.stats.device_prefix_blocks == 2 and m.stats.lookup_hit_blocks == 3
    assert m.plan_load(r, 3) == (3, r.block_hashes[3:5])  # device 3 > tier 2: not covered


def test_plan_load_stops_at_the_first_tier_miss_and_respects_min_blocks():
    m, c = make(min_load=2)
    r = req("a", 21)  # 5 full blocks
    c.stored.update([r.block_hashes[0], r.block_hashes[2], r.block_hashes[3]])
    assert m.plan_load(r, 0) == (0, [])  # only 1 leading block in the tier: below min_load_blocks
    assert m.plan_load(r, 2) == (2, r.block_hashes[2:4])  # block 0 not in the tier: not covered
    assert m.plan_load(r, 4) == (0, [])  # 1 candidate < min_load_blocks: no lookup at all
    assert len(c.lookups) == 3


def test_evict_policy_queues_each_evicted_hash_once():
    m, c = make("evict")
    h1, h2 = b"1" * 32, b"2" * 32
    m.on_evict(h1, 5)
    m.on_evict(h1, 6)  # same content evicted again before the save finished
    m.on_evict(h2, 7)
    assert m.pending_saves == [KVSave(h1, 5), KVSave(h2, 7)]
    saves = m.take_pending_saves()
    assert saves == [KVSave(h1, 5), KVSave(h2, 7)] and m.pending_saves == []
    m.on_evict(h1, 8)  # being written: skipped
    c.confirm_saves([h1], dropped=[h2])
    assert m.poll() == []
    assert list(m.known) == [h1]
    m.on_evict(h1, 9)  # stored: skipped
    m.on_evict(h2, 9)  # its save was dropped: queued again
    assert m.take_pending_saves() == [KVSave(h2, 9)]
    assert m.stats.saves_queued == 3 and m.stats.saves_skipped == 3  # pending, in flight, stored
    assert m.stats.saves_done == 1 and m.stats.saves_dropped == 1


def test_finish_policy_saves_registered_blocks_at_finish_only():
    m, _ = make("finish")
    r = req("a", 9)
    m.on_evict(b"x" * 32, 3)
    assert m.pending_saves == []  # evictions are not saved under "finish"
    r.status = RequestStatus.FINISHED_LENGTH
    m.on_request_finished(r, [(r.block_hashes[0], 4), (r.block_hashes[1], 2)])
    assert m.take_pending_saves() == [KVSave(r.block_hashes[0], 4), KVSave(r.block_hashes[1], 2)]
    failed = req("b", 9, start=50)
    failed.status = RequestStatus.FINISHED_ERROR  # its last step never ran: its KV is garbage
    m.on_request_finished(failed, [(failed.block_hashes[0], 1)])
    assert m.pending_saves == []


def test_known_hint_is_a_bounded_lru():
    m, c = make("evict", known=2)
    hs = [bytes([i]) * 32 for i in range(3)]
    for i, h in enumerate(hs):
        m.on_evict(h, i)
    m.take_pending_saves()
    c.confirm_saves(hs)
    m.poll()
    assert list(m.known) == hs[1:]  # the oldest fell out
    m.on_evict(hs[0], 0)
    assert m.pending_saves == [KVSave(hs[0], 0)]


def test_load_truncated_mid_way_keeps_only_the_leading_blocks():
    m, c = make()
    r = req("a", 21)
    c.stored.update(r.block_hashes[1:])
    start, hashes = m.plan_load(r, 1)
    assert (start, hashes) == (1, r.block_hashes[1:5])
    m.start_load("a", 1, hashes)
    assert c.submitted == {"a": hashes}
    assert m.poll() == []  # still in flight
    c.finish_load("a", 2)  # the third block came back None (corrupt / evicted)
    assert m.poll() == ["a"]
    assert m.usable_load("a", 1) == (r.block_hashes[1:3], 0)
    assert r.block_hashes[3] not in m.known and r.block_hashes[1] in m.known
    assert m.stats.blocks_loaded == 2 and m.stats.blocks_truncated == 2
    assert m.plan_load(r, 1) == (0, [])  # one load per admission
    m.consume_load("a", 2)
    assert not m.has_ready_load("a") and m.stats.blocks_used == 2


def test_usable_load_follows_the_device_hit():
    m, c = make()
    r = req("a", 21)
    c.stored.update(r.block_hashes)
    m.start_load("a", 1, r.block_hashes[1:5])
    c.finish_load("a")
    m.poll()
    # Meanwhile the device computed block 1 too: the loaded copy of it is skipped.
    assert m.usable_load("a", 2) == (r.block_hashes[2:5], 1)
    # Device hit grew past every loaded block: nothing to copy.
    assert m.usable_load("a", 5) == ([], 4)
    # Device prefix shrank (block 0 evicted while loading): a gap, so none is usable.
    assert m.usable_load("a", 0) == ([], 0)
    m.consume_load("a", 0)
    assert c.cancelled == ["a"]  # host copies freed, nothing for the runner
    assert m.stats.blocks_discarded == 4


def test_cancel_drops_in_flight_and_ready_loads():
    m, c = make()
    r = req("a", 21)
    c.stored.update(r.block_hashes)
    m.start_load("a", 0, r.block_hashes[:3])
    m.cancel("a")
    assert m.num_loads_in_flight == 0 and c.cancelled == ["a"]
    m.start_load("b", 0, r.block_hashes[:3])
    c.finish_load("b")
    m.poll()
    m.cancel("b")
    assert not m.has_ready_load("b") and m.stats.blocks_discarded == 3
    # A late completion of a cancelled load is ignored.
    c._events.loads["a"] = 3
    assert m.poll() == []


def seed_known(m: KVOffloadManager, c: FakeTierClient, hashes: list) -> None:
    """Make `hashes` confirmed saves (what a tier most likely holds)."""
    for i, hh in enumerate(hashes):
        m.on_evict(hh, i)
    m.take_pending_saves()
    c.confirm_saves(hashes)
    m.poll()


def test_a_truncated_load_forgets_the_hints_of_every_block_it_did_not_read():
    """The blocks after a miss were never read: a hint for them may be as wrong as the
    miss, so their recomputed blocks are saved again (rewriting a corrupt entry)."""
    m, c = make("evict")
    r = req("a", 21)
    seed_known(m, c, r.block_hashes[:5])
    start, hashes = m.plan_load(r, 0)
    assert hashes == r.block_hashes[:5]
    m.start_load("a", start, hashes)
    c.finish_load("a", 1)                 # block 1 came back corrupt
    m.poll()
    assert r.block_hashes[0] in m.known
    assert not any(hh in m.known for hh in r.block_hashes[1:5])
    m.consume_load("a", 1)
    for i, hh in enumerate(r.block_hashes[:5]):   # the recomputed blocks leave the device
        m.on_evict(hh, i)
    assert [s.block_hash for s in m.take_pending_saves()] == r.block_hashes[1:5]


def test_unsaved_lists_what_no_tier_holds_whatever_the_policy():
    m, c = make("finish")
    hs = [bytes([i]) * 32 for i in range(5)]
    m.policy = OffloadPolicy.EVICT
    seed_known(m, c, hs[:1])              # confirmed
    m.on_evict(hs[1], 1)
    m.take_pending_saves()                # handed to the saver, not confirmed
    m.on_evict(hs[2], 2)                  # queued, not copied out yet
    m.policy = OffloadPolicy.FINISH
    assert m.unsaved([(h, i) for i, h in enumerate(hs)]) == [KVSave(hs[3], 3), KVSave(hs[4], 4)]
    assert m.pending_saves == [KVSave(hs[2], 2)]   # unsaved() queues nothing
