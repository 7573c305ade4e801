"""Preemption by swap: a preempted request's KV blocks go to a host block buffer and back.

The scheduler side (pure Python, like the KV manager): host slots, which request holds
which, and the choice between swap and recompute.  The executor does the copies
(kvserve/worker/swap_space.py), from the step's `swap_outs` / `swap_ins`
(protocol.BlockCopy), before the step's forward.

    preempt:  choose(tokens, blocks) -> "swap" | "recompute"
              swap_out(rid, device block ids)  -> BlockCopy (device -> host slots)
    resume:   swap_in(rid, device block ids)   -> BlockCopy (host slots -> device)
    finish:   drop(rid)

Invariants:
- a request is swapped (holds host slots) from its swap-out until its swap-in is
  emitted; while swapped its `num_computed_tokens` counts the swapped tokens, its
  first cdiv(num_computed_tokens, block_size) blocks are in the slots, in order;
- slots read by a swap-in are released only at the next `begin_step` (the next
  schedule), after the executor ran the step that reads them: a swap-out of the
  same step may therefore never overwrite them (the executor runs swap-outs first,
  as device blocks freed by a swap-out may be the targets of a swap-in);
- slots are handed out lowest first, so a request's slots are mostly contiguous runs
  (the executor copies each run as one group).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional

from kvserve.protocol import BlockCopy

PREEMPTION_MODES = ("recompute", "swap", "auto")


@dataclass(frozen=True)
class PreemptionCostModel:
    """Seconds to bring a preempted request back, each way.

    swap:       its KV bytes out and back in over the host link (2 transfers);
    recompute:  the forward FLOPs of its tokens at the device's peak (matmuls
                `flops_per_token` each, plus causal attention over them).
    Both are lower bounds of the roofline kind (kvserve/bench/roofline.py); what
    matters for the choice is their ratio, which grows with the context length
    for recompute (quadratic attention) but not for swap.
    """

    block_bytes: int
    block_size: int
    link_bandwidth: float  # bytes/s, one direction
    flops_per_token: float
    peak_flops: float
    attn_flops_per_pair: float = 0.0

    def swap_s(self, num_blocks: int) -> float:
        return 2.0 * num_blocks * self.block_bytes / self.link_bandwidth

    def recompute_s(self, num_tokens: int) -> float:
        pairs = num_tokens * (num_tokens + 1) / 2.0
        return (num_tokens * self.flops_per_token + pairs * self.attn_flops_per_pair) / self.peak_flops


class SwapManager:
    def __init__(self, num_host_blocks: int, mode: str = "auto",
                 cost: Optional[PreemptionCostModel] = None) -> None:
        if mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {list(PREEMPTION_MODES)}, got {mode!r}")
        if num_host_blocks < 0:
            raise ValueError(f"the host swap space needs >= 0 blocks, got {num_host_blocks}")
        if mode == "auto" and cost is None:
            raise ValueError("preemption_mode 'auto' needs a cost model")
        self.mode = mode
        self.cost = cost
        self.num_host_blocks = num_host_blocks
        self._free: list[int] = list(range(num_host_blocks))  # a heap: lowest slot first
        self.swapped: dict[str, list[int]] = {}
        self._release_next: list[int] = []
        self.num_blocks_out = 0
        self.num_blocks_in = 0

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def is_swapped(self, request_id: str) -> bool:
        return request_id in self.swapped

    def choose(self, num_tokens: int, num_blocks: int) -> str:
        """"swap" or "recompute" for a victim with `num_tokens` computed in `num_blocks` blocks."""
        if self.mode == "recompute" or num_blocks == 0 or num_blocks > len(self._free):
            return "recompute"  # nothing to keep, or no room on the host: recompute
        if self.mode == "swap":
            return "swap"
        assert self.cost is not None
        return "swap" if self.cost.swap_s(num_blocks) < self.cost.recompute_s(num_tokens) else "recompute"

    def swap_out(self, request_id: str, block_ids: list[int]) -> BlockCopy:
        assert request_id not in self.swapped, f"{request_id} is already swapped out"
        assert len(block_ids) <= len(self._free), "choose() said there was room"
        slots = [heapq.heappop(self._free) for _ in block_ids]
        self.swapped[request_id] = slots
        self.num_blocks_out += len(slots)
        return BlockCopy(list(block_ids), slots)

    def swap_in(self, request_id: str, block_ids: list[int], skip: int = 0) -> BlockCopy:
        """Copy the request's slots from index `skip` on into `block_ids` (the device already
        holds its first `skip` blocks, e.g. as prefix-cache hits); release the slots."""
        slots = self.swapped.pop(request_id)
        assert len(block_ids) == len(slots) - skip, f"{len(block_ids)} device blocks for {len(slots) - skip} slots"
        self._release_next.extend(slots)
        self.num_blocks_in += len(block_ids)
        return BlockCopy(list(block_ids), slots[skip:])

    def drop(self, request_id: str) -> None:
        """The request finished while swapped out: its slots are free (after this step)."""
        slots = self.swapped.pop(request_id, None)
        if slots:
            self._release_next.extend(slots)

    def begin_step(self) -> None:
        """The previous step ran: slots it read are free for reuse."""
        for slot in self._release_next:
            heapq.heappush(self._free, slot)
        self._release_next.clear()

    def check_integrity(self) -> None:
        held = [s for slots in self.swapped.values() for s in slots] + self._release_next + self._free
        assert sorted(held) == list(range(self.num_host_blocks)), "host slots lost or held twice"
