"""KV sources: where a request's next tokens can come from, other than computing them.

The scheduler asks an ordered list of sources, at admission, how many of the
request's next tokens each can supply after those the sources before it supply,
and at what cost.  Each answers with a `KVPlan`, opaque to the scheduler:

    DevicePrefixCache  blocks already in the device pool (prefix-cache hits); ready, cost 0
    OffloadTiers       blocks a KV tier (host memory, disk, Redis) holds; fetched in the
                       background first (the request waits in WAITING_FOR_KV), then copied
                       into fresh device blocks before the step's forward
    (next)             a remote peer's blocks (prefill/decode disaggregation), position-
                       independent document chunks (CacheBlend)

The rule stays in the scheduler: a request whose plans are all ready is admitted
with `num_computed_tokens` = the tokens they supply; one with a plan that is not
ready waits while that source fetches (`fetch`), and is looked up again when
`poll` says the fetch finished.  The KV manager executes the plans it is given
(`KVCacheManager.allocate_plans`): it shares a plan's `shared_blocks` and
allocates fresh blocks registered under its `fill_hashes`; the source then turns
the device block ids it got into transfers for the executor (`placed` -> KVLoad).

Sources also see the device pool's evictions (`on_evict`), finished requests
(`on_finished`) and hand over the blocks to copy out (`take_saves`), which the
scheduler puts in the step (SchedulerOutput.kv_saves).  A source whose fetches the
executor runs hands them over the same way (`take_fetches`, `take_cancels` ->
SchedulerOutput.kv_fetches / kv_cancels) and hears what finished from the step
output (`on_transfers_done` <- ModelRunnerOutput.kv_transfers_done): one route,
plain data, for every transfer.

Invariant: plans are contiguous and in source order; every plan that shares
device blocks comes before every plan that fills fresh ones.
"""
from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from kvserve.core.block_pool import KVBlock
from kvserve.core.clock import Clock, wall_clock
from kvserve.core.kv_offload import KVOffloadManager, StepTierClient
from kvserve.hashing import BlockHash
from kvserve.protocol import KVFetch, KVLoad, KVSave, KVTransferEvents
from kvserve.request import Request, RequestStatus

if TYPE_CHECKING:
    from kvserve.core.kv_cache_manager import KVCacheManager


@dataclass(slots=True)
class KVPlan:
    """One source's offer for a request's next tokens."""

    source: KVSource
    num_tokens: int  # tokens supplied, right after those of the plans before this one
    cost_s: float = 0.0  # estimated seconds before they are on the device (0: they are)
    ready: bool = True  # False: the source must fetch first (KVSource.fetch); the request waits
    # Executed by the KV manager (the scheduler never reads these):
    shared_blocks: list[KVBlock] = field(default_factory=list)  # device blocks to share
    fill_hashes: list[BlockHash] = field(default_factory=list)  # fresh device blocks, registered under these
    state: Any = None  # the source's own bookkeeping


class KVSource(ABC):
    """One supplier of KV; every hook but `plan` is optional."""

    name: ClassVar[str] = "abstract"

    def plan(self, request: Request, num_supplied: int, repeat: bool) -> Optional[KVPlan]:
        """What this source can supply of `request`'s tokens from position `num_supplied`
        on (the sources before it supply those before), or None.  `repeat`: the same
        admission was looked up before (the request came back from a fetch), so
        statistics must not count it again."""
        raise NotImplementedError

    def fetch(self, request: Request, plan: KVPlan) -> None:
        """Start fetching a plan that is not ready; `poll` reports when it is."""
        raise NotImplementedError(f"{self.name} returned a plan that is not ready but cannot fetch")

    def poll(self) -> list[str]:
        """Ids of requests whose fetch finished since the last call."""
        return []

    def placed(self, request: Request, plan: KVPlan, block_ids: list[int]) -> list[KVLoad]:
        """The KV manager executed `plan` into device blocks `block_ids` (shared, then filled);
        return the copies the executor must make into them before the step's forward."""
        return []

    def on_evict(self, block_hash: BlockHash, block_id: int) -> None:
        """The device pool is about to reuse cached block `block_id` (content intact until the next forward)."""

    def on_finished(self, request: Request, kv: KVCacheManager) -> None:
        """`request` finished; its blocks are still held (freed right after)."""

    def take_saves(self) -> list[KVSave]:
        """Device blocks to copy out in the next step (before its forward)."""
        return []

    def take_finished(self) -> list[tuple[str, RequestStatus, Optional[str | int]]]:
        """Requests this source ends before they run (request id, status, stop reason): a
        transfer that failed (FINISHED_ERROR, the reason for the client; never recomputed
        instead), or one whose supplied tokens already finish it.  The scheduler finishes
        them (Scheduler.finish_from_sources) before each schedule."""
        return []

    def take_fetches(self) -> list[KVFetch]:
        """Background loads for the next step's executor to start."""
        return []

    def take_cancels(self) -> list[str]:
        """Request ids whose loads the next step's executor drops (before its fetches)."""
        return []

    def on_transfers_done(self, events: KVTransferEvents) -> None:
        """What a step's executor reported finished (loads of any source: skip unknown ids)."""


class DevicePrefixCache(KVSource):
    """The longest run of the request's leading blocks cached in the device pool."""

    name = "device"

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv

    def plan(self, request: Request, num_supplied: int, repeat: bool) -> Optional[KVPlan]:
        assert num_supplied == 0, "the device prefix cache is the first source"
        blocks, num_tokens = self.kv.get_computed_blocks(request, count_stats=not repeat)
        return KVPlan(self, num_tokens, shared_blocks=blocks)


# Before any load was timed: an assumed host-memory-speed fetch.
_DEFAULT_S_PER_BLOCK = 1e-3
# Weight of the newest measurement in the running estimate.
_EWMA_WEIGHT = 0.2


class OffloadTiers(KVSource):
    """Blocks the KV tiers hold after the device hit, through a KVOffloadManager (its
    invariants hold: at most one load per admission, loads continue the device hit).

    An engine's manager talks to the tiers through a StepTierClient: this source then
    hands the loads it starts and cancels to the step and the step output's finished
    transfers back to it.  Another client (tests' fakes) acts on the spot."""

    name = "tiers"

    def __init__(self, offload: KVOffloadManager, kv: KVCacheManager, clock: Clock = wall_clock) -> None:
        if not kv.enable_prefix_caching:
            raise ValueError("KV offload tiers need prefix caching (blocks are found by hash)")
        self.offload = offload
        client = offload.client
        self.steps: Optional[StepTierClient] = client if isinstance(client, StepTierClient) else None
        self.block_size = kv.block_size
        self.clock = clock
        # Seconds per fetched block, a running estimate from timed loads (for `cost_s`).
        self.seconds_per_block = _DEFAULT_S_PER_BLOCK
        self._started: dict[str, tuple[float, int]] = {}  # request id -> (fetch start, blocks)
        kv.add_evict_listener(self.on_evict)

    def plan(self, request: Request, num_supplied: int, repeat: bool) -> Optional[KVPlan]:
        rid = request.request_id
        num_device_blocks = num_supplied // self.block_size
        if self.offload.has_ready_load(rid):
            # Back from a fetch: the loaded blocks that still continue the device hit.
            hashes, first = self.offload.usable_load(rid, num_device_blocks)
            return KVPlan(self, len(hashes) * self.block_size, fill_hashes=hashes, state=first)
        start, hashes = self.offload.plan_load(request, num_device_blocks)
        if not hashes:
            return None
        beyond = start + len(hashes) - num_device_blocks  # blocks after the device hit
        return KVPlan(self, beyond * self.block_size, cost_s=len(hashes) * self.seconds_per_block,
                      ready=False, state=(start, hashes))

    def fetch(self, request: Request, plan: KVPlan) -> None:
        start, hashes = plan.state
        self._started[request.request_id] = (self.clock(), len(hashes))
        self.offload.start_load(request.request_id, start, hashes)

    def poll(self) -> list[str]:
        ready = self.offload.poll()
        now = self.clock()
        for rid in ready:
            started = self._started.pop(rid, None)
            if started is not None and started[1] > 0:
                per_block = max(0.0, now - started[0]) / started[1]
                self.seconds_per_block += _EWMA_WEIGHT * (per_block - self.seconds_per_block)
        return ready

    def placed(self, request: Request, plan: KVPlan, block_ids: list[int]) -> list[KVLoad]:
        first: int = plan.state
        self.offload.consume_load(request.request_id, len(plan.fill_hashes), first)
        return [KVLoad(request.request_id, first, block_ids)] if plan.fill_hashes else []

    def on_evict(self, block_hash: BlockHash, block_id: int) -> None:
        self.offload.on_evict(block_hash, block_id)

    def on_finished(self, request: Request, kv: KVCacheManager) -> None:
        self.offload.on_request_finished(request, kv.cached_blocks(request))
        self.offload.cancel(request.request_id)
        self._started.pop(request.request_id, None)

    def take_saves(self) -> list[KVSave]:
        return self.offload.take_pending_saves()

    def take_fetches(self) -> list[KVFetch]:
        return self.steps.take_fetches() if self.steps is not None else []

    def take_cancels(self) -> list[str]:
        return self.steps.take_cancels() if self.steps is not None else []

    def on_transfers_done(self, events: KVTransferEvents) -> None:
        if self.steps is not None:
            self.steps.deliver(events)
