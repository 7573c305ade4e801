"""The host swap space: a round trip restores every byte of the swapped blocks, copies go in
runs of consecutive host slots, and SwapExecutor orders tier saves, swaps and the runner."""
from __future__ import annotations

import torch

from kvserve.protocol import BlockCopy, KVSave, ModelRunnerOutput, SchedulerOutput
from kvserve.worker.swap_space import HostSwapSpace, SwapExecutor, host_runs


def caches(num_blocks: int = 10, layers: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn((2, num_blocks, 4, 2, 8), generator=g) for _ in range(layers)]


def test_host_runs_group_consecutive_slots():
    c = BlockCopy([7, 3, 5, 1, 2], [0, 1, 2, 6, 7])
    assert list(host_runs(c)) == [(0, [7, 3, 5]), (6, [1, 2])]
    assert list(host_runs(c, max_len=2)) == [(0, [7, 3]), (2, [5]), (6, [1, 2])]


def test_round_trip_restores_the_blocks_elsewhere():
    kv = caches()
    before = [layer[:, [2, 5, 6]].clone() for layer in kv]
    space = HostSwapSpace(kv, num_host_blocks=8)
    space.apply([BlockCopy([2, 5, 6], [3, 4, 0])], [])
    for layer in kv:
        layer.zero_()  # the device blocks are reused meanwhile
    space.apply([], [BlockCopy([9, 1, 0], [3, 4, 0])])
    for layer, old in zip(kv, before):
        assert torch.equal(layer[:, [9, 1, 0]], old)
        assert not layer[:, [2, 5, 6]].any()


class _Runner:
    def __init__(self, kv: list[torch.Tensor]) -> None:
        self.kv_caches = kv
        self.calls: list[str] = []
        self.kv_transfer = self
        self.extra = "visible"

    def save(self, saves: list[KVSave]) -> None:
        # A tier save must see the block before the swap-in overwrites it.
        self.calls.append(f"save {saves[0].block_id} {float(self.kv_caches[0][0, saves[0].block_id].sum()):.3f}")

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        self.calls.append(f"execute saves={len(step.kv_saves)}")
        return ModelRunnerOutput()


def test_executor_orders_saves_then_swaps_then_the_runner():
    kv = caches()
    runner = _Runner(kv)
    ex = SwapExecutor(runner, num_host_blocks=4)
    before = float(kv[0][0, 3].sum())
    ex.execute(SchedulerOutput(swap_outs=[BlockCopy([3], [0])]))
    ex.execute(SchedulerOutput(kv_saves=[KVSave(b"h", 4)], swap_outs=[], swap_ins=[BlockCopy([4], [0])]))
    assert runner.calls[1].startswith("save 4 ") and float(runner.calls[1].split()[2]) != round(before, 3)
    assert runner.calls[2] == "execute saves=0"  # the runner does not save again
    assert float(kv[0][0, 4].sum()) == before  # block 3's content now in block 4
    assert ex.extra == "visible"
