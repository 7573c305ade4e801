"""KVTierIO: background loads/saves against a real cpu tier; truncation, cancel, back-pressure."""
from __future__ import annotations

import hashlib

import pytest
import torch

from kvserve.engine.kv_tier_io import KVTierIO
from kvserve.kv_store import KVNamespace, build_kv_store

NS = KVNamespace.create("test-model@0", torch.float32, num_layers=2, num_kv_heads=1, head_dim=4, block_size=2)


def h(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def blk(i: int) -> torch.Tensor:
    return torch.full(NS.block_shape, float(i))


@pytest.fixture
def io():
    store = build_kv_store("cpu:1MiB", NS)
    x = KVTierIO(store, max_pending_save_bytes=1 << 20)
    yield x
    x.close()


def test_load_truncates_at_the_first_miss(io):
    for i in range(4):
        io.store.put(h(i), blk(i))
    io.store.remove(h(2))
    assert io.lookup([h(0), h(1), h(2), h(3)]) == 2
    io.submit_load("r", [h(0), h(1), h(2), h(3)])
    assert io.drain(10)
    ev = io.poll()
    assert ev.loads == {"r": 2}
    got = io.take_loaded("r")
    assert [int(b[0, 0, 0, 0, 0]) for b in got] == [0, 1]
    assert io.take_loaded("r") == []


def test_cancelled_load_is_never_delivered_and_a_reused_id_gets_its_own_blocks(io):
    for i in range(3):
        io.store.put(h(i), blk(i))
    io.submit_load("r", [h(0)])
    io.cancel_load("r")
    io.submit_load("r", [h(1), h(2)])  # same id, new request
    assert io.drain(10)
    assert io.poll().loads == {"r": 2}
    assert [int(b[0, 0, 0, 0, 0]) for b in io.take_loaded("r")] == [1, 2]
    io.submit_load("x", [h(0)])
    io.drain(10)
    io.cancel_load("x")  # finished but not yet polled
    assert io.poll().loads == {}


def test_saves_reach_the_store_and_are_reported(io):
    io.submit_saves([(h(5), blk(5)), (h(6), blk(6))])
    assert io.drain(10)
    ev = io.poll()
    assert ev.saved == [h(5), h(6)] and ev.dropped == []
    assert torch.equal(io.store.get(h(6)), blk(6))


def test_saves_beyond_the_pending_bound_are_dropped_not_blocked():
    store = build_kv_store("cpu:1MiB", NS)
    io = KVTierIO(store, max_pending_save_bytes=NS.block_nbytes)  # room for one block
    try:
        io.submit_saves([(h(1), blk(1)), (h(2), blk(2))])
        assert io.drain(10)
        ev = io.poll()
        assert ev.saved == [] and ev.dropped == [h(1), h(2)]
        assert io.stats.saves_dropped == 2 and not store.contains(h(1))
    finally:
        io.close()


class BrokenStore:
    def longest_prefix(self, keys):
        raise RuntimeError("boom")

    def get_many(self, keys):
        raise RuntimeError("boom")

    def put_many(self, items):
        raise RuntimeError("boom")

    def close(self):
        pass


def test_a_failing_store_is_a_miss_never_an_exception():
    io = KVTierIO(BrokenStore())
    try:
        assert io.lookup([h(0)]) == 0
        io.submit_load("r", [h(0)])
        io.submit_saves([(h(1), blk(1))])
        assert io.drain(10)
        ev = io.poll()
        assert ev.loads == {"r": 0} and ev.dropped == [h(1)]
        assert io.stats.errors == 3
    finally:
        io.close()


def test_close_writes_queued_saves_first():
    store = build_kv_store("cpu:1MiB", NS)
    io = KVTierIO(store)
    io.submit_saves([(h(i), blk(i)) for i in range(8)])
    hits_before_close = []
    orig_close = store.close
    store.close = lambda: (hits_before_close.append(sum(store.contains_many([h(i) for i in range(8)]))),
                           orig_close())
    io.close()
    assert hits_before_close == [8]


class GatedStore:
    """A cpu-tier store whose put_many waits for `gate` (a slow disk or Redis)."""

    def __init__(self) -> None:
        import threading

        self.inner = build_kv_store("cpu:1MiB", NS)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.persisted: list[bytes] = []
        self.written: list[bytes] = []

    def put_many(self, items):
        self.entered.set()
        self.gate.wait(30)
        self.inner.put_many(items)
        self.written.extend(k for k, _ in items)

    def persist_many(self, items):
        self.persisted.extend(k for k, _ in items)

    def close(self):
        self.inner.close()


def test_close_gives_up_after_its_timeout_and_still_stops_both_threads():
    import threading

    store = GatedStore()
    io = KVTierIO(store)
    io.submit_saves([(h(i), blk(i)) for i in range(12)])   # 3 chunks of 4
    assert store.entered.wait(10)
    threading.Timer(0.3, store.gate.set).start()          # the chunk in hand finishes later
    assert io.close(timeout=0.1) is False
    assert not any(t.is_alive() for t in io._threads)
    # The chunk being written completed; the rest was abandoned, never half-written.
    assert io.stats.saves == 4 and io.stats.saves_abandoned == 8
    assert store.written == [h(i) for i in range(4)]
    io.submit_saves([(h(20), blk(20))])                   # after close: dropped, not queued
    assert io.stats.saves_dropped == 1


def test_persist_saves_go_to_persist_many():
    store = GatedStore()
    io = KVTierIO(store)
    try:
        io.submit_saves([(h(1), blk(1))], persist=True)
        assert io.drain(10) and store.persisted == [h(1)] and not store.entered.is_set()
    finally:
        io.close()


def test_wait_for_room_waits_for_the_saver():
    store = GatedStore()
    io = KVTierIO(store, max_pending_save_bytes=2 * NS.block_nbytes)
    try:
        io.submit_saves([(h(1), blk(1)), (h(2), blk(2))])
        assert io.wait_for_room(NS.block_nbytes, timeout=0.05) is False   # full, saver stuck
        store.gate.set()
        assert io.wait_for_room(NS.block_nbytes, timeout=10) is True
    finally:
        store.gate.set()
        io.close()


def test_exit_hook_closes_an_io_nobody_closed():
    store = build_kv_store("cpu:1MiB", NS)
    io = KVTierIO(store)
    io.submit_saves([(h(i), blk(i)) for i in range(8)])
    hook = io._exit_hook
    assert hook.alive and hook.atexit   # weakref.finalize: called at interpreter exit
    written = []
    orig_close = store.close
    store.close = lambda: (written.append(sum(store.contains_many([h(i) for i in range(8)]))), orig_close())
    hook()                              # what interpreter exit does
    assert io.closed and written == [8] and not any(t.is_alive() for t in io._threads)
    io.close()                          # idempotent; the hook was used up
    assert written == [8]


def test_close_detaches_the_exit_hook():
    io = KVTierIO(build_kv_store("cpu:1MiB", NS))
    io.close()
    assert not io._exit_hook.alive
