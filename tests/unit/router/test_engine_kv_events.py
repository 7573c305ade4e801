"""The engine side of KV events: the recorder on the block pool, and the API process's log.

Each test drives a real KVCacheManager (or KVEventLog) and checks that replaying the events gives
exactly the pool's cached hashes, evictions and resets included.
"""
from __future__ import annotations

import asyncio
import random

import pytest

from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.kv_events import KVEventRecorder, replay
from kvserve.entrypoints.openai.kv_events import KVEventLog
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams

BS = 4


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(request_id=rid, prompt_token_ids=tokens, sampling_params=SamplingParams(max_tokens=1),
                   block_size=BS)


def _run(kv: KVCacheManager, req: Request) -> None:
    """Admit `req` as the scheduler does (prefix hit, then room for the rest), then finish it."""
    blocks, hit = kv.get_computed_blocks(req)
    req.num_computed_tokens = hit
    assert kv.allocate_slots(req, req.num_tokens - hit, blocks) is not None
    req.num_computed_tokens = req.num_tokens
    kv.free(req)
    kv.check_integrity()


def test_replayed_events_equal_the_cache_through_evictions() -> None:
    kv = KVCacheManager(num_blocks=12, block_size=BS)
    rec = KVEventRecorder.attach(kv)
    rng = random.Random(0)
    mirror: set[bytes] = set()
    prefixes = [[rng.randrange(50) for _ in range(8)] for _ in range(3)]
    for i in range(40):
        tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 14))]
        _run(kv, _request(f"r{i}", tokens))
        if i % 3 == 0:  # consumers take at any time
            replay(rec.take(), mirror)
            assert mirror == set(kv.pool.cached)
    replay(rec.take(), mirror)
    assert kv.pool.num_evictions > 10, "the workload must evict"
    assert mirror == set(kv.pool.cached)


def test_reset_is_all_cleared_and_overflow_becomes_a_snapshot() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    rec = KVEventRecorder.attach(kv, max_pending=3)
    _run(kv, _request("a", list(range(9))))  # 2 full blocks stored
    assert rec.take() == [("stored", list(kv.pool.cached))]
    assert kv.pool.reset_prefix_cache()
    _run(kv, _request("b", list(range(100, 109))))
    records = rec.take()
    assert records[0] == ("all_cleared", []) and replay(records, {b"x" * 32}) == set(kv.pool.cached)
    for i in range(3):  # 6 hashes > max_pending: the next take is a snapshot
        _run(kv, _request(f"c{i}", list(range(200 + 20 * i, 209 + 20 * i))))
    records = rec.take()
    assert rec.num_snapshots == 1 and records[0] == ("all_cleared", [])
    assert replay(records, {b"stale" * 6 + b"xx"}) == set(kv.pool.cached)
    with pytest.raises(RuntimeError, match="already has"):
        KVEventRecorder.attach(kv)


def _apply(answer: dict, into: set[bytes]) -> set[bytes]:
    for ev in answer["events"]:
        if ev["type"] == "all_cleared":
            into.clear()
        elif ev["type"] == "stored":
            into.update(bytes.fromhex(h) for h in ev["block_hashes"])
        else:
            into.difference_update(bytes.fromhex(h) for h in ev["block_hashes"])
    return into


def test_log_follow_gap_snapshot_and_epoch() -> None:
    log = KVEventLog(BS, max_hashes=4, max_events=2)
    h = [bytes([i]) * 32 for i in range(8)]
    log.append([("stored", [h[0], h[1]]), ("removed", [h[0]])])
    first = log.answer(None, None)  # a new follower: snapshot
    assert first["snapshot"] and first["seq"] == 2 and _apply(first, set()) == {h[1]}
    log.append([("stored", [h[2]]), ("stored", [h[3]]), ("removed", [h[1]])])
    view = _apply(first, set())
    a = log.answer(first["epoch"], first["seq"])
    assert not a["snapshot"] and a["more"] and a["seq"] == 4  # max_events per answer
    b = log.answer(a["epoch"], a["seq"])
    assert not b["more"] and b["seq"] == 5
    assert _apply(b, _apply(a, view)) == log.cached == {h[2], h[3]}
    log.append([("stored", [h[4], h[5], h[6], h[7]])])  # pushes seq 3..5 out (max_hashes)
    late = log.answer(first["epoch"], 3)
    assert late["snapshot"] and _apply(late, {h[0]}) == log.cached
    other = log.answer("another-epoch", log.seq)
    assert other["snapshot"]
    assert log.answer(log.epoch, log.seq)["events"] == []


def test_log_long_poll_wakes_on_append() -> None:
    async def main() -> tuple[dict, dict]:
        log = KVEventLog(BS)
        waiter = asyncio.create_task(log.wait(log.epoch, 0, 5.0))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        log.append([("stored", [b"a" * 32])])
        woke = await asyncio.wait_for(waiter, 1.0)
        idle = await log.wait(log.epoch, log.seq, 0.05)  # nothing new: empty after the wait
        return woke, idle

    woke, idle = asyncio.run(main())
    assert woke["seq"] == 1 and woke["events"][0]["block_hashes"] == ["61" * 32]
    assert idle["events"] == [] and idle["seq"] == 1
