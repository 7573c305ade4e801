"""A global index of which instance holds which KV blocks, named by the engine's block hashes.

Two sources feed it:
  * the router's own routing decisions (`record_routed`): after a request goes to an instance,
    that instance will have computed and cached the request's full prompt blocks.  This is a
    prediction: the instance may evict them later without telling anyone, so such entries expire
    after `ttl_s` unless they are routed to again;
  * KV events from the instances (`apply_stored` / `apply_removed` / `clear_instance`, see
    kv_events.py): what an instance reports it stored is authoritative and does not expire; what it
    reports removed is dropped whatever its source.

Memory is bounded per instance (`capacity_blocks`): past it, the least recently used predicted
entry goes first, then the least recently used reported one.

Invariants (`check_integrity` holds them in tests):
  * a hash is in `_holders[h]` iff it is in that instance's `predicted` or `stored` map;
  * no hash is in both maps of one instance;
  * `predicted` is ordered by expiry (entries are appended with now + ttl and the clock is
    monotonic), so expired entries are always at its front.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from kvserve.hashing import BlockHash


@dataclass(slots=True)
class _InstanceBlocks:
    # hash -> expiry time (clock units); oldest / soonest to expire first
    predicted: OrderedDict[BlockHash, float] = field(default_factory=OrderedDict)
    # hash -> None; least recently used first
    stored: OrderedDict[BlockHash, None] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self.predicted) + len(self.stored)


class KVIndex:
    """Block hash -> instances that (probably) hold it, with per-instance LRU capacity and a TTL."""

    def __init__(self, capacity_blocks: int = 200_000, ttl_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.capacity_blocks = capacity_blocks
        self.ttl_s = ttl_s
        self._clock = clock
        self._holders: dict[BlockHash, set[str]] = {}
        self._instances: dict[str, _InstanceBlocks] = {}
        self.evictions = 0  # entries dropped for capacity
        self.expirations = 0  # predicted entries dropped for age

    # ------------------------------------------------------------------ queries
    def overlap_blocks(self, hashes: Sequence[BlockHash], instances: Iterable[str]) -> dict[str, int]:
        """For each instance, how many *leading* blocks of `hashes` it holds.

        Counting stops at the first block an instance lacks, as the engine's prefix match does
        (a block hash chains over its parent, so a later block without the earlier ones is no hit).
        """
        now = self._clock()
        result = {name: 0 for name in instances}
        alive = set(result)
        for k, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            alive = {name for name in alive if name in holders and self._valid(name, h, now)}
            if not alive:
                break
            for name in alive:
                result[name] = k + 1
        return result

    def num_blocks(self, instance: str) -> int:
        blocks = self._instances.get(instance)
        return len(blocks) if blocks is not None else 0

    def holds(self, instance: str, h: BlockHash) -> bool:
        return instance in self._holders.get(h, ()) and self._valid(instance, h, self._clock())

    def instances(self) -> list[str]:
        return list(self._instances)

    def reported(self, instance: str) -> set[BlockHash]:
        """The hashes `instance` reported stored (KV events), without the predicted ones."""
        blocks = self._instances.get(instance)
        return set(blocks.stored) if blocks is not None else set()

    # ---------------------------------------------------------------- updates
    def record_routed(self, instance: str, hashes: Sequence[BlockHash]) -> None:
        """`instance` was sent a request whose full prompt blocks are `hashes` (a prediction)."""
        blocks = self._blocks(instance)
        expiry = self._clock() + self.ttl_s
        for h in hashes:
            if h in blocks.stored:
                blocks.stored.move_to_end(h)  # reported by the instance: only refresh its recency
                continue
            blocks.predicted.pop(h, None)  # re-append: keeps `predicted` in expiry order
            blocks.predicted[h] = expiry
            self._holders.setdefault(h, set()).add(instance)
        self._enforce_capacity(instance, blocks)

    def apply_stored(self, instance: str, hashes: Sequence[BlockHash]) -> None:
        """`instance` reports it cached `hashes` (authoritative, no expiry)."""
        blocks = self._blocks(instance)
        for h in hashes:
            blocks.predicted.pop(h, None)
            blocks.stored.pop(h, None)
            blocks.stored[h] = None
            self._holders.setdefault(h, set()).add(instance)
        self._enforce_capacity(instance, blocks)

    def apply_removed(self, instance: str, hashes: Sequence[BlockHash]) -> None:
        """`instance` reports it evicted `hashes`; unknown hashes are ignored."""
        blocks = self._instances.get(instance)
        if blocks is None:
            return
        for h in hashes:
            if blocks.predicted.pop(h, None) is not None or h in blocks.stored:
                blocks.stored.pop(h, None)
                self._drop_holder(h, instance)

    def clear_instance(self, instance: str) -> int:
        """Forget everything about `instance` (it cleared its cache, restarted or was removed)."""
        blocks = self._instances.pop(instance, None)
        if blocks is None:
            return 0
        for h in list(blocks.predicted) + list(blocks.stored):
            self._drop_holder(h, instance)
        return len(blocks)

    def expire(self) -> int:
        """Drop every expired predicted entry now (lookups already ignore them); returns how many."""
        now = self._clock()
        dropped = 0
        for instance, blocks in self._instances.items():
            while blocks.predicted:
                h, expiry = next(iter(blocks.predicted.items()))
                if expiry > now:
                    break
                del blocks.predicted[h]
                self._drop_holder(h, instance)
                dropped += 1
        self.expirations += dropped
        return dropped

    # ---------------------------------------------------------------- helpers
    def _blocks(self, instance: str) -> _InstanceBlocks:
        blocks = self._instances.get(instance)
        if blocks is None:
            blocks = self._instances[instance] = _InstanceBlocks()
        return blocks

    def _valid(self, instance: str, h: BlockHash, now: float) -> bool:
        blocks = self._instances[instance]
        if h in blocks.stored:
            return True
        expiry = blocks.predicted.get(h)
        return expiry is not None and expiry > now

    def _drop_holder(self, h: BlockHash, instance: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(instance)
            if not holders:
                del self._holders[h]

    def _enforce_capacity(self, instance: str, blocks: _InstanceBlocks) -> None:
        while len(blocks) > self.capacity_blocks:
            source = blocks.predicted if blocks.predicted else blocks.stored
            h, _ = source.popitem(last=False)
            self._drop_holder(h, instance)
            self.evictions += 1

    def check_integrity(self) -> None:
        """Raise AssertionError if an invariant in the module docstring is broken (tests)."""
        seen: dict[BlockHash, set[str]] = {}
        for instance, blocks in self._instances.items():
            both = set(blocks.predicted) & set(blocks.stored)
            assert not both, f"{instance}: {len(both)} hashes both predicted and stored"
            expiries = list(blocks.predicted.values())
            assert expiries == sorted(expiries), f"{instance}: predicted entries out of expiry order"
            assert len(blocks) <= self.capacity_blocks, f"{instance}: over capacity"
            for h in list(blocks.predicted) + list(blocks.stored):
                seen.setdefault(h, set()).add(instance)
        assert seen == self._holders, "holder sets disagree with the per-instance maps"


def optional_hash(text: Optional[str]) -> Optional[BlockHash]:
    """A hex block hash from JSON (None stays None); ValueError names what is wrong."""
    if text is None:
        return None
    return parse_hash(text)


def parse_hash(text: str) -> BlockHash:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"block hash {text[:80]!r} is not hexadecimal") from None
    if len(raw) != 32:
        raise ValueError(f"block hash {text[:80]!r} has {len(raw)} bytes; kvserve block hashes are 32 (SHA-256)")
    return raw
