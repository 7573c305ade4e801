"""KV event ingestion with synthetic batches: format, validation (all or nothing), seq gaps."""
from __future__ import annotations

import json

import pytest

from kvserve.hashing import hash_block_tokens
from kvserve.router.kv_events import KVEventError, KVEventIngestor
from kvserve.router.kv_index import KVIndex

A = "http://127.0.0.1:9001"
B = "http://127.0.0.1:9002"
HASHES = hash_block_tokens(list(range(64)), 16)  # 4 chained blocks, as the engine names them


@pytest.fixture
def ingestor() -> KVEventIngestor:
    return KVEventIngestor(KVIndex(capacity_blocks=100, ttl_s=10), 16, {A, B})


def batch(events: list[dict], instance: str = A, **extra: object) -> bytes:
    return json.dumps({"instance": instance, "events": events, **extra}).encode()


def stored(hashes: list[bytes], parent: bytes | None = None) -> dict:
    return {"type": "stored", "block_hashes": [x.hex() for x in hashes],
            "parent_block_hash": parent.hex() if parent else None}


def test_stored_removed_cleared_apply_in_order(ingestor: KVEventIngestor) -> None:
    idx = ingestor.index
    r = ingestor.ingest(batch([stored(HASHES[:2]), stored(HASHES[2:], HASHES[1]),
                               {"type": "removed", "block_hashes": [HASHES[3].hex()]}], block_size=16))
    assert (r.stored, r.removed, r.cleared, r.gap) == (4, 1, 0, False)
    assert idx.overlap_blocks(HASHES, [A, B]) == {A: 3, B: 0}
    ingestor.ingest(batch([stored(HASHES[:1])], instance=B + "/"))  # a trailing slash names the same instance
    assert idx.overlap_blocks(HASHES, [A, B]) == {A: 3, B: 1}
    r = ingestor.ingest(batch([{"type": "all_cleared"}, stored(HASHES[:1])]))
    assert r.cleared == 1
    assert idx.overlap_blocks(HASHES, [A, B]) == {A: 1, B: 1}
    idx.check_integrity()


@pytest.mark.parametrize("raw,match", [
    (b"not json", "invalid KV event batch"),
    (json.dumps({"instance": A, "events": [{"type": "stored", "block_hashes": []}]}).encode(), "block_hashes"),
    (json.dumps({"instance": A, "events": [{"type": "moved", "block_hashes": ["00"]}]}).encode(), "events"),
    (json.dumps({"instance": A, "events": [], "extra": 1}).encode(), "extra"),
    (json.dumps({"instance": "http://elsewhere:1", "events": []}).encode(), "unknown instance"),
    (json.dumps({"instance": A, "block_size": 32, "events": []}).encode(), "block_size is 32"),
])
def test_bad_batches_are_refused(ingestor: KVEventIngestor, raw: bytes, match: str) -> None:
    with pytest.raises(KVEventError, match=match):
        ingestor.ingest(raw)


def test_a_bad_hash_changes_nothing(ingestor: KVEventIngestor) -> None:
    raw = batch([stored(HASHES[:2]), {"type": "removed", "block_hashes": ["xyz"]}])
    with pytest.raises(KVEventError, match="not hexadecimal"):
        ingestor.ingest(raw)
    assert ingestor.index.num_blocks(A) == 0  # the valid first event was not applied either


def test_seq_gap_resets_the_instance(ingestor: KVEventIngestor) -> None:
    idx = ingestor.index
    ingestor.ingest(batch([stored(HASHES[:2])], seq=1))
    ingestor.ingest(batch([stored(HASHES[2:3])], seq=2))
    assert idx.num_blocks(A) == 3
    r = ingestor.ingest(batch([stored(HASHES[3:])], seq=4))  # batch 3 was lost
    assert r.gap
    assert idx.num_blocks(A) == 1 and idx.holds(A, HASHES[3])
    with pytest.raises(KVEventError, match="not after"):
        ingestor.ingest(batch([], seq=4))
    ingestor.forget_instance(A)  # restarted: it may count from 0 again
    assert not ingestor.ingest(batch([], seq=0)).gap
