"""A dict-backed KVTierClient whose loads finish only when a test says so."""
from __future__ import annotations

from collections.abc import Sequence

from kvserve.core.hashing import BlockHash
from kvserve.core.kv_offload import TierEvents


class FakeTierClient:
    def __init__(self) -> None:
        self.stored: set[BlockHash] = set()
        self.lookups: list[list[BlockHash]] = []
        self.submitted: dict[str, list[BlockHash]] = {}  # in flight
        self.cancelled: list[str] = []
        self._events = TierEvents()

    # KVTierClient
    def lookup(self, block_hashes: Sequence[BlockHash]) -> int:
        self.lookups.append(list(block_hashes))
        n = 0
        for h in block_hashes:
            if h not in self.stored:
                break
            n += 1
        return n

    def submit_load(self, request_id: str, block_hashes: Sequence[BlockHash]) -> None:
        self.submitted[request_id] = list(block_hashes)

    def poll(self) -> TierEvents:
        ev, self._events = self._events, TierEvents()
        return ev

    def cancel_load(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        self.submitted.pop(request_id, None)

    # test controls
    def finish_load(self, request_id: str, num_loaded: int | None = None) -> None:
        """Complete a submitted load with its first `num_loaded` blocks (default: all stored ones)."""
        hashes = self.submitted.pop(request_id)
        if num_loaded is None:
            num_loaded = self.lookup(hashes)
        self._events.loads[request_id] = num_loaded

    def confirm_saves(self, hashes: Sequence[BlockHash], dropped: Sequence[BlockHash] = ()) -> None:
        self.stored.update(hashes)
        self._events.saved.extend(hashes)
        self._events.dropped.extend(dropped)
