"""The executor side of preemption by swap: a host block buffer and the copies in and out.

Host buffer: [num_host_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
(the layout of kv_transfer.gather_blocks), pinned on CUDA so copies are asynchronous.

`SwapExecutor` wraps any executor with a `kv_caches` list (the ModelRunner) and
applies a step's `swap_outs` and `swap_ins` (kvserve/core/swap.py) before handing
the step on.  Order within a step (each may reuse the blocks of the one before):

    tier kv_saves  ->  swap-outs  ->  swap-ins  ->  (the runner:) tier kv_loads, forward

Copies go in block groups: contiguous runs of host slots, at most GROUP_BLOCKS
blocks each, one gather/scatter per layer and one host transfer per group.  On
CUDA they run on a side stream: the CPU never waits for them (it goes on to build
the step's inputs and launch the forward), and the forward's stream waits for the
copies on the GPU only (an event), so other requests' steps are not blocked by a
synchronous copy.  On CPU the copies are plain memory copies.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import torch

from kvserve.protocol import BlockCopy, ModelRunnerOutput, SchedulerOutput

GROUP_BLOCKS = 64


def host_runs(copy: BlockCopy, max_len: int = GROUP_BLOCKS) -> Iterator[tuple[int, list[int]]]:
    """(first host slot, device block ids) for each run of consecutive host slots."""
    i, n = 0, len(copy.host_slots)
    while i < n:
        j = i + 1
        while j < n and j - i < max_len and copy.host_slots[j] == copy.host_slots[j - 1] + 1:
            j += 1
        yield copy.host_slots[i], copy.block_ids[i:j]
        i = j


class HostSwapSpace:
    def __init__(self, kv_caches: Sequence[torch.Tensor], num_host_blocks: int) -> None:
        first = kv_caches[0]
        _, _, bs, h, d = first.shape
        self.kv_caches = list(kv_caches)
        self.device = first.device
        cuda = first.device.type == "cuda"
        self.host = torch.empty((num_host_blocks, len(kv_caches), 2, bs, h, d), dtype=first.dtype,
                                device="cpu", pin_memory=cuda)
        self.stream = torch.cuda.Stream(device=first.device) if cuda else None

    def _idx(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long).to(self.device, non_blocking=True)

    def swap_out(self, copy: BlockCopy) -> None:
        for start, block_ids in host_runs(copy):
            idx = self._idx(block_ids)
            staging = torch.empty((len(block_ids),) + self.host.shape[1:], dtype=self.host.dtype,
                                  device=self.device)
            for layer, kv in enumerate(self.kv_caches):
                staging[:, layer] = kv.index_select(1, idx).transpose(0, 1)
            self.host[start:start + len(block_ids)].copy_(staging, non_blocking=True)

    def swap_in(self, copy: BlockCopy) -> None:
        for start, block_ids in host_runs(copy):
            idx = self._idx(block_ids)
            staging = self.host[start:start + len(block_ids)].to(self.device, non_blocking=True)
            for layer, kv in enumerate(self.kv_caches):
                kv.index_copy_(1, idx, staging[:, layer].transpose(0, 1))

    def apply(self, swap_outs: Sequence[BlockCopy], swap_ins: Sequence[BlockCopy]) -> None:
        if self.stream is None:
            for c in swap_outs:
                self.swap_out(c)
            for c in swap_ins:
                self.swap_in(c)
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # the blocks hold what earlier forwards wrote
        with torch.cuda.stream(self.stream):
            for c in swap_outs:
                self.swap_out(c)
            for c in swap_ins:
                self.swap_in(c)
        main.wait_stream(self.stream)  # the forward reads/overwrites them after the copies


class SwapExecutor:
    """An executor that applies a step's swaps, then runs the wrapped one (see module doc).
    Other attributes are the wrapped executor's."""

    def __init__(self, runner: Any, num_host_blocks: int) -> None:
        self.runner = runner
        self.space = HostSwapSpace(runner.kv_caches, num_host_blocks)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        if step.swap_outs or step.swap_ins:
            transfer = getattr(self.runner, "kv_transfer", None)
            if step.kv_saves and transfer is not None:
                # Tier saves read blocks a swap-in may overwrite: they go first.
                transfer.save(step.kv_saves)
                step = dataclasses.replace(step, kv_saves=[])
            self.space.apply(step.swap_outs, step.swap_ins)
        return self.runner.execute(step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)
