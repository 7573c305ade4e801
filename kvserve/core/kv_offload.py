"""KV offload policy: which block hashes go down to the tiers and which come back up.

Pure Python (no torch, no I/O): the tiers are reached through `KVTierClient`.
An engine's is `StepTierClient`: loads to start and cancel leave in the step
(SchedulerOutput.kv_fetches / kv_cancels), the executor's background thread
(engine/kv_tier_io.py) runs them and the step output reports them finished
(ModelRunnerOutput.kv_transfers_done).  Tests implement the client with a dict.
The scheduler drives this manager:

    admission:  plan_load(request, num_device_blocks) -> hashes to fetch (or [])
                start_load(...)        the request then waits in WAITING_FOR_KV
    each step:  poll() -> request ids whose loads finished (back to the queue)
                usable_load(...)       which loaded blocks extend the device hit
                consume_load(...)      after the device blocks are allocated
    evictions:  on_evict(hash, block_id)          (BlockPool hook, "evict" policy)
    finishes:   on_request_finished(request, blocks) ("finish" policy)
                take_pending_saves() -> KVSave list  (the runner copies them out
                                        of the device pool before the next forward)

Invariants:
- a request has at most one load in flight and at most one ready load; a ready
  load is used (or discarded) by exactly one admission, so a request never
  loops between WAITING and WAITING_FOR_KV;
- loaded blocks always continue the chain right after a device prefix hit:
  `usable_load` never returns blocks that leave a gap.  To keep a load useful
  when the device prefix is evicted while it is in flight (small pools), a
  load also covers the device-hit blocks when a tier holds them and they are
  no more than the tier blocks (at most 2x the I/O); copies of blocks still on
  the device are skipped;
- the last prompt token is never matched (its logits are needed), exactly like
  the device prefix cache;
- `known` is a *hint* (an LRU of hashes some tier most likely holds) used only
  to skip redundant saves; a wrong hint costs a miss later, never wrong data.
"""
from __future__ import annotations

import dataclasses
import enum
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvserve.hashing import BlockHash
from kvserve.protocol import KVFetch, KVLoad, KVSave, KVTransferEvents  # step types (KVLoad, KVSave re-exported for older imports)
from kvserve.request import Request, RequestStatus


class OffloadPolicy(str, enum.Enum):
    """When device blocks are written to the tiers."""

    EVICT = "evict"    # a cached block is saved when the device pool evicts it for reuse
    FINISH = "finish"  # a request's full blocks are saved when it finishes

    @classmethod
    def parse(cls, value: str | OffloadPolicy) -> OffloadPolicy:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"kv_offload_policy must be one of {[p.value for p in cls]}, got {value!r}"
            ) from None


# What the tier client finished since the last poll (the step output's type).
TierEvents = KVTransferEvents


class KVTierClient(Protocol):
    """The scheduler's view of the KV tiers (in an engine: StepTierClient)."""

    def lookup(self, block_hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of `block_hashes` some tier holds (a hint)."""

    def submit_load(self, request_id: str, block_hashes: Sequence[BlockHash]) -> None:
        """Start fetching these blocks into host memory (non-blocking)."""

    def poll(self) -> TierEvents:
        """Loads and saves finished since the last call (non-blocking)."""

    def cancel_load(self, request_id: str) -> None:
        """Forget the request's load, in flight or finished, and free its host memory."""


class StepTierClient:
    """An engine's KVTierClient: loads travel in the steps, as plain data, never as calls
    from the scheduler into the executor's tier I/O.

    `submit_load` / `cancel_load` queue a KVFetch / a cancel that the scheduler puts in the
    next step (SchedulerOutput.kv_fetches / kv_cancels, via `take_fetches` / `take_cancels`);
    the executor starts or drops the load.  What the executor reports finished
    (ModelRunnerOutput.kv_transfers_done) is handed to `deliver` and comes back from
    `poll`.  `lookup` is the one call: a read of the tiers' index (which blocks some tier
    holds), as in vLLM's scheduler-side KV connector.

    The executor applies a step's cancels before its fetches, so a load cancelled and
    started again for the same request id within one step is the new one.
    """

    def __init__(self, lookup: Callable[[Sequence[BlockHash]], int]) -> None:
        self._lookup = lookup
        self._fetches: dict[str, KVFetch] = {}  # request id -> load to start (insertion order)
        self._cancels: dict[str, None] = {}     # request ids whose loads to drop (ordered set)
        self._events = KVTransferEvents()

    # KVTierClient
    def lookup(self, block_hashes: Sequence[BlockHash]) -> int:
        return self._lookup(block_hashes)

    def submit_load(self, request_id: str, block_hashes: Sequence[BlockHash]) -> None:
        self._fetches[request_id] = KVFetch(request_id, list(block_hashes))

    def cancel_load(self, request_id: str) -> None:
        # A fetch not sent yet is simply not sent; the cancel still goes, for a load (or
        # host copies) the executor may already hold.  Dropping nothing is a no-op there.
        self._fetches.pop(request_id, None)
        self._cancels[request_id] = None

    def poll(self) -> KVTransferEvents:
        events, self._events = self._events, KVTransferEvents()
        return events

    # step side (the scheduler's OffloadTiers source)
    def take_fetches(self) -> list[KVFetch]:
        fetches = list(self._fetches.values())
        self._fetches.clear()
        return fetches

    def take_cancels(self) -> list[str]:
        cancels = list(self._cancels)
        self._cancels.clear()
        return cancels

    def deliver(self, events: KVTransferEvents) -> None:
        """Fold in what a step's executor reported (read by the next `poll`)."""
        self._events.loads.update(events.loads)
        self._events.saved.extend(events.saved)
        self._events.dropped.extend(events.dropped)

    @property
    def has_unsent(self) -> bool:
        return bool(self._fetches or self._cancels)


@dataclass(slots=True)
class _Load:
    start_block: int  # index in request.block_hashes of the first loaded block
    block_hashes: list[BlockHash]


@dataclass(slots=True)
class OffloadStats:
    """Monotonic counters (blocks unless named otherwise)."""

    lookups: int = 0             # tier lookups at admission
    lookup_hit_blocks: int = 0   # blocks the lookups reported
    loads_started: int = 0
    blocks_requested: int = 0    # blocks asked of the loader
    blocks_loaded: int = 0       # blocks the loader returned (a prefix of those requested)
    blocks_truncated: int = 0    # requested but not returned (miss/corrupt mid-way): recomputed
    blocks_used: int = 0         # loaded blocks placed into the device pool
    blocks_discarded: int = 0    # loaded but unusable (device prefix evicted meanwhile, request finished)
    blocks_on_device: int = 0    # loaded but not copied: the device already had them
    device_prefix_blocks: int = 0  # device-hit blocks a load also covered (see module doc)
    saves_queued: int = 0
    saves_skipped: int = 0       # not saved: a tier most likely holds the hash already
    saves_done: int = 0
    saves_dropped: int = 0       # refused by the saver (back-pressure)

    def snapshot(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class KVOffloadManager:
    def __init__(self, client: KVTierClient, block_size: int, policy: OffloadPolicy | str = OffloadPolicy.EVICT,
                 known_capacity: int = 65536, min_load_blocks: int = 1) -> None:
        if min_load_blocks < 1:
            raise ValueError(f"min_load_blocks must be >= 1, got {min_load_blocks}")
        self.client = client
        self.block_size = block_size
        self.policy = OffloadPolicy.parse(policy)
        self.min_load_blocks = min_load_blocks
        self.known_capacity = max(0, known_capacity)
        # Hashes some tier most likely holds, LRU order (oldest first).
        self.known: OrderedDict[BlockHash, None] = OrderedDict()
        self.loads_in_flight: dict[str, _Load] = {}
        self.loads_ready: dict[str, _Load] = {}
        # Saves to copy out of the device pool before the next forward pass.
        self.pending_saves: list[KVSave] = []
        self._pending_hashes: set[BlockHash] = set()
        self._saving: set[BlockHash] = set()  # handed to the saver, not yet confirmed
        self.stats = OffloadStats()

    # ------------------------------------------------------------------ hints
    def _remember(self, block_hash: BlockHash) -> None:
        if self.known_capacity == 0:
            return
        self.known[block_hash] = None
        self.known.move_to_end(block_hash)
        while len(self.known) > self.known_capacity:
            self.known.popitem(last=False)

    def _likely_stored(self, block_hash: BlockHash) -> bool:
        return block_hash in self.known or block_hash in self._pending_hashes or block_hash in self._saving

    # ------------------------------------------------------------------ saves
    def on_evict(self, block_hash: BlockHash, block_id: int) -> None:
        """BlockPool hook: `block_id` is about to be reused; its content is still intact
        until the next forward pass, which is when the runner copies queued saves out."""
        if self.policy is OffloadPolicy.EVICT:
            self._queue_save(block_hash, block_id)

    def on_request_finished(self, request: Request, block_hashes_and_ids: Iterable[tuple[BlockHash, int]]) -> None:
        """Before `request`'s blocks are freed: under "finish", queue its full cached blocks.

        Only blocks registered in the prefix cache are passed in; their KV was
        written by an executed step.  A request that failed in a step may hold
        registered blocks whose step never ran, so it saves nothing.
        """
        if self.policy is not OffloadPolicy.FINISH or request.status == RequestStatus.FINISHED_ERROR:
            return
        for block_hash, block_id in block_hashes_and_ids:
            self._queue_save(block_hash, block_id)

    def _queue_save(self, block_hash: BlockHash, block_id: int) -> None:
        if self._likely_stored(block_hash):
            self.stats.saves_skipped += 1
            if block_hash in self.known:
                self.known.move_to_end(block_hash)
            return
        self.pending_saves.append(KVSave(block_hash, block_id))
        self._pending_hashes.add(block_hash)
        self.stats.saves_queued += 1

    def unsaved(self, blocks: Iterable[tuple[BlockHash, int]]) -> list[KVSave]:
        """The (hash, block id) pairs no tier most likely holds, as saves, whatever the
        policy: what the engine writes to persistent tiers on close.  Not queued."""
        return [KVSave(h, b) for h, b in blocks if not self._likely_stored(h)]

    def take_pending_saves(self) -> list[KVSave]:
        saves, self.pending_saves = self.pending_saves, []
        for s in saves:
            self._pending_hashes.discard(s.block_hash)
            self._saving.add(s.block_hash)
        return saves

    # ------------------------------------------------------------------ loads
    def plan_load(self, request: Request, num_device_blocks: int) -> tuple[int, list[BlockHash]]:
        """(first block index, hashes to fetch) for a device hit of `num_device_blocks`,
        or (0, []) when no tier holds blocks after it.

        The tier hit is counted on the hashes after the device hit; the load may
        start earlier (see the module invariants).  Never includes the block
        holding the last token (its logits are needed), and never more than one
        load per admission (see `has_ready_load`).
        """
        rid = request.request_id
        d = num_device_blocks
        if rid in self.loads_in_flight or rid in self.loads_ready:
            return 0, []
        max_blocks = min((request.num_tokens - 1) // self.block_size, len(request.block_hashes))
        candidates = request.block_hashes[d:max_blocks]
        if len(candidates) < self.min_load_blocks:
            return 0, []
        self.stats.lookups += 1
        n = self.client.lookup(candidates)
        n = max(0, min(n, len(candidates)))
        self.stats.lookup_hit_blocks += n
        if n < self.min_load_blocks:
            return 0, []
        start = d
        if 0 < d <= n and self.client.lookup(request.block_hashes[:d]) == d:
            start = 0
            self.stats.device_prefix_blocks += d
        return start, list(request.block_hashes[start:d + n])

    def start_load(self, request_id: str, start_block: int, block_hashes: Sequence[BlockHash]) -> None:
        assert request_id not in self.loads_in_flight and request_id not in self.loads_ready
        self.loads_in_flight[request_id] = _Load(start_block, list(block_hashes))
        self.stats.loads_started += 1
        self.stats.blocks_requested += len(block_hashes)
        self.client.submit_load(request_id, block_hashes)

    def poll(self) -> list[str]:
        """Fold finished tier work in; return the ids of requests whose load is now ready."""
        events = self.client.poll()
        for h in events.saved:
            self._saving.discard(h)
            self._remember(h)
        self.stats.saves_done += len(events.saved)
        for h in events.dropped:
            self._saving.discard(h)
        self.stats.saves_dropped += len(events.dropped)
        ready = []
        for rid, n in events.loads.items():
            load = self.loads_in_flight.pop(rid, None)
            if load is None:
                continue  # cancelled meanwhile
            n = max(0, min(n, len(load.block_hashes)))
            # A miss mid-way (evicted, corrupt, unreachable) truncates the hit:
            # only the leading blocks actually loaded are used; the rest is recomputed.
            self.stats.blocks_loaded += n
            self.stats.blocks_truncated += len(load.block_hashes) - n
            for h in load.block_hashes[:n]:
                self._remember(h)
            for h in load.block_hashes[n:]:
                # The hint was wrong for the first; the rest were not read, so they are
                # unconfirmed: forget them too, so that their recomputed blocks are saved
                # again (rewriting a corrupt entry) instead of being skipped as stored.
                self.known.pop(h, None)
            self.loads_ready[rid] = _Load(load.start_block, load.block_hashes[:n])
            ready.append(rid)
        return ready

    def has_ready_load(self, request_id: str) -> bool:
        return request_id in self.loads_ready

    def usable_load(self, request_id: str, num_device_blocks: int) -> tuple[list[BlockHash], int]:
        """(hashes that extend a device hit of `num_device_blocks`, index of the first
        of them within the loaded blocks).  Empty when the device hit changed so
        that the loaded blocks no longer continue it (they are then recomputed)."""
        load = self.loads_ready.get(request_id)
        if load is None:
            return [], 0
        first = num_device_blocks - load.start_block
        if first < 0:  # device prefix shrank while loading: a gap; use none
            return [], 0
        return load.block_hashes[first:], first

    def consume_load(self, request_id: str, num_used: int, first: int = 0) -> None:
        """The admission used `num_used` loaded blocks from index `first` (those before
        it were on the device already); the rest are dropped."""
        load = self.loads_ready.pop(request_id, None)
        if load is None:
            return
        on_device = min(max(0, first), len(load.block_hashes))
        self.stats.blocks_used += num_used
        self.stats.blocks_on_device += on_device
        self.stats.blocks_discarded += len(load.block_hashes) - num_used - on_device
        if num_used == 0:
            self.client.cancel_load(request_id)  # nothing for the runner to copy: free the host copies

    def cancel(self, request_id: str) -> None:
        """The request finished or was aborted: drop its load wherever it is.

        Also frees host copies a failed step never took (the client's cancel
        is a no-op for a request it holds nothing for)."""
        self.loads_in_flight.pop(request_id, None)
        ready = self.loads_ready.pop(request_id, None)
        if ready is not None:
            self.stats.blocks_discarded += len(ready.block_hashes)
        self.client.cancel_load(request_id)

    @property
    def num_loads_in_flight(self) -> int:
        return len(self.loads_in_flight)
