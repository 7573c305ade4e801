"""KVIndex: exact state after each operation (leading-block overlap, TTL, LRU capacity, events)."""
from __future__ import annotations

import hashlib

import pytest

from kvserve.router.kv_index import KVIndex, parse_hash


def h(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_overlap_counts_leading_blocks_only(clock: Clock) -> None:
    idx = KVIndex(capacity_blocks=100, ttl_s=10, clock=clock)
    idx.record_routed("A", [h(1), h(2), h(3)])
    idx.record_routed("B", [h(1), h(5)])
    idx.check_integrity()
    assert idx.overlap_blocks([h(1), h(2), h(3), h(4)], ["A", "B", "C"]) == {"A": 3, "B": 1, "C": 0}
    # B holds h(5) but not h(2): a later block without the earlier ones is no prefix hit.
    assert idx.overlap_blocks([h(1), h(2), h(5)], ["B"]) == {"B": 1}
    assert idx.overlap_blocks([h(9), h(1)], ["A", "B"]) == {"A": 0, "B": 0}
    assert idx.overlap_blocks([], ["A"]) == {"A": 0}
    assert idx.num_blocks("A") == 3 and idx.num_blocks("B") == 2 and idx.num_blocks("C") == 0


def test_predicted_entries_expire_after_ttl_and_refresh_when_routed_again(clock: Clock) -> None:
    idx = KVIndex(capacity_blocks=100, ttl_s=10, clock=clock)
    idx.record_routed("A", [h(1), h(2)])
    clock.t += 6
    idx.record_routed("A", [h(1)])  # h(1) refreshed to expire at +16, h(2) still at +10
    clock.t += 5  # now +11
    assert idx.overlap_blocks([h(1), h(2)], ["A"]) == {"A": 1}
    assert idx.holds("A", h(1)) and not idx.holds("A", h(2))
    assert idx.expire() == 1
    idx.check_integrity()
    assert idx.num_blocks("A") == 1
    clock.t += 10
    assert idx.expire() == 1 and idx.num_blocks("A") == 0
    assert idx.expirations == 2
    idx.check_integrity()


def test_capacity_evicts_least_recently_routed_first(clock: Clock) -> None:
    idx = KVIndex(capacity_blocks=3, ttl_s=100, clock=clock)
    idx.record_routed("A", [h(1), h(2), h(3)])
    clock.t += 1
    idx.record_routed("A", [h(1)])  # h(1) is now the most recent
    idx.record_routed("A", [h(4)])  # over capacity: h(2) (oldest) goes
    idx.check_integrity()
    assert [idx.holds("A", h(i)) for i in (1, 2, 3, 4)] == [True, False, True, True]
    assert idx.evictions == 1
    # Capacity is per instance: B is unaffected by A's entries.
    idx.record_routed("B", [h(2), h(3), h(5)])
    assert idx.num_blocks("A") == 3 and idx.num_blocks("B") == 3
    idx.check_integrity()


def test_reported_blocks_do_not_expire_and_outlive_predictions_under_capacity(clock: Clock) -> None:
    idx = KVIndex(capacity_blocks=3, ttl_s=10, clock=clock)
    idx.apply_stored("A", [h(1), h(2)])
    idx.record_routed("A", [h(1), h(2), h(3)])  # h(1), h(2) stay "stored"; h(3) predicted
    idx.check_integrity()
    clock.t += 100
    assert idx.overlap_blocks([h(1), h(2), h(3)], ["A"]) == {"A": 2}  # h(3) expired, h(1..2) did not
    idx.record_routed("A", [h(7)])
    idx.record_routed("A", [h(8)])  # over capacity: predicted entries go before reported ones
    idx.check_integrity()
    assert idx.holds("A", h(1)) and idx.holds("A", h(2)) and idx.holds("A", h(8)) and not idx.holds("A", h(7))


def test_removed_and_cleared(clock: Clock) -> None:
    idx = KVIndex(capacity_blocks=10, ttl_s=10, clock=clock)
    idx.record_routed("A", [h(1), h(2), h(3)])
    idx.apply_stored("B", [h(1), h(2)])
    idx.apply_removed("A", [h(2), h(99)])  # a predicted entry goes too; unknown hashes are ignored
    idx.apply_removed("C", [h(1)])  # unknown instance: nothing happens
    idx.check_integrity()
    assert idx.overlap_blocks([h(1), h(2), h(3)], ["A", "B"]) == {"A": 1, "B": 2}
    assert idx.clear_instance("B") == 2
    assert idx.clear_instance("B") == 0
    idx.check_integrity()
    assert idx.overlap_blocks([h(1)], ["A", "B"]) == {"A": 1, "B": 0}
    assert idx.instances() == ["A"]


def test_parse_hash() -> None:
    assert parse_hash(h(1).hex()) == h(1)
    with pytest.raises(ValueError, match="not hexadecimal"):
        parse_hash("zz" * 32)
    with pytest.raises(ValueError, match="32"):
        parse_hash("ab" * 16)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        KVIndex(capacity_blocks=0)
    with pytest.raises(ValueError):
        KVIndex(ttl_s=0)
