"""Copies KV blocks between the device pool and host block tensors.

Device pool, per layer l:   kv_caches[l]  [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]
Host block (kv_store):      block         [num_layers, 2, block_size, num_kv_heads, head_dim]

Every tier transfer reaches the executor in the step and leaves it in the step's
output (kvserve/protocol.py); the scheduler never touches the tier I/O:

    KVTransfer.start(cancels, fetches)  first thing in a step: drop loads, start
                                        background loads (no device memory touched)
    KVTransfer.apply(saves, loads)      before the forward: saves first (their blocks
                                        may be reused by this very step, so their old
                                        content must leave first), then loads (fresh
                                        blocks of requests admitted this step)
    KVTransfer.finished()               after the forward: loads finished, saves
                                        written -> ModelRunnerOutput.kv_transfers_done

Encoding and tier I/O happen elsewhere, on background threads; this module only
copies and hands requests over.  No policy decisions.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from kvserve.hashing import BlockHash
from kvserve.protocol import KVFetch, KVLoad, KVSave, KVTransferEvents


class HostBlockIO(Protocol):
    """Where copied-out blocks go and loaded blocks come from: background loader and
    saver threads (engine/kv_tier_io.py's KVTierIO)."""

    def submit_saves(self, items: list[tuple[BlockHash, torch.Tensor]]) -> None: ...

    def take_loaded(self, request_id: str) -> list[torch.Tensor]: ...

    def submit_load(self, request_id: str, block_hashes: Sequence[BlockHash]) -> None: ...

    def cancel_load(self, request_id: str) -> None: ...

    def poll(self) -> KVTransferEvents: ...


def gather_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int]) -> torch.Tensor:
    """Host copy of device blocks: [n, num_layers, 2, block_size, num_kv_heads, head_dim].

    The result owns its memory (never a view of the pool), so the pool may be
    overwritten right after this returns.
    """
    first = kv_caches[0]
    idx = torch.tensor(list(block_ids), dtype=torch.long, device=first.device)
    n = len(block_ids)
    _, _, bs, h, d = first.shape
    out = torch.empty((n, len(kv_caches), 2, bs, h, d), dtype=first.dtype, device=first.device)
    for layer, kv in enumerate(kv_caches):
        # kv[:, idx]: [2, n, bs, h, d] -> out[:, layer]: [n, 2, bs, h, d]
        out[:, layer] = kv.index_select(1, idx).transpose(0, 1)
    if out.device.type != "cpu":
        out = out.to("cpu")
    return out


def scatter_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int],
                   blocks: Sequence[torch.Tensor]) -> None:
    """Write host blocks ([num_layers, 2, block_size, H, D] each) into device blocks `block_ids`."""
    if len(blocks) != len(block_ids):
        raise ValueError(f"{len(blocks)} blocks for {len(block_ids)} block ids")
    if not blocks:
        return
    first = kv_caches[0]
    stacked = torch.stack(list(blocks)).to(device=first.device, dtype=first.dtype)  # [n, L, 2, bs, H, D]
    if stacked.shape[1] != len(kv_caches) or stacked.shape[3:] != first.shape[2:]:
        raise ValueError(f"block shape {tuple(stacked.shape[1:])} does not match the pool "
                         f"({len(kv_caches)} layers, {tuple(first.shape)})")
    idx = torch.tensor(list(block_ids), dtype=torch.long, device=first.device)
    for layer, kv in enumerate(kv_caches):
        kv.index_copy_(1, idx, stacked[:, layer].transpose(0, 1))


class KVTransfer:
    def __init__(self, kv_caches: Sequence[torch.Tensor], io: HostBlockIO) -> None:
        self.kv_caches = kv_caches
        self.io = io

    def start(self, cancels: Sequence[str], fetches: Sequence[KVFetch]) -> None:
        """Drop the loads of `cancels` (in flight or loaded; a no-op for ids with none),
        then start `fetches` in the background: a request id cancelled and fetched again
        in one step gets the new load."""
        for request_id in cancels:
            self.io.cancel_load(request_id)
        for fetch in fetches:
            self.io.submit_load(fetch.request_id, fetch.block_hashes)

    def finished(self) -> KVTransferEvents:
        """Loads finished and saves written or dropped since the last call (non-blocking)."""
        return self.io.poll()

    def apply(self, saves: Sequence[KVSave], loads: Sequence[KVLoad]) -> None:
        if saves:
            self.save(saves)
        for load in loads:
            self.load(load)

    def save(self, saves: Sequence[KVSave]) -> None:
        host = gather_blocks(self.kv_caches, [s.block_id for s in saves])
        self.io.submit_saves([(s.block_hash, host[i]) for i, s in enumerate(saves)])

    def load(self, load: KVLoad) -> None:
        blocks = self.io.take_loaded(load.request_id)[load.first:load.first + len(load.block_ids)]
        if len(blocks) != len(load.block_ids):
            # The scheduler only plans loads of blocks the loader returned; a
            # mismatch is a bug, and writing a partial table would be silent garbage.
            raise RuntimeError(f"request {load.request_id}: {len(blocks)} loaded blocks for "
                               f"{len(load.block_ids)} device blocks")
        scatter_blocks(self.kv_caches, load.block_ids, blocks)
