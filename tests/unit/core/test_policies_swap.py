"""Preemption by swap, on exact scheduler state: which blocks go to which host slots, what
comes back where, when slots are reused, the swap/recompute choice, and the counters."""
from __future__ import annotations

import pytest

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.scheduler import Scheduler
from kvserve.core.swap import PreemptionCostModel, SwapManager
from kvserve.protocol import BlockCopy, ModelRunnerOutput, SampledToken, SchedulerOutput
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams

BS = 4


def req(rid: str, n: int, arrival: float, start: int, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens), arrival_time=arrival,
                   block_size=BS)


def make(num_blocks: int, swap: SwapManager | None, prefix_caching: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                     KVCacheManager(num_blocks, BS, enable_prefix_caching=prefix_caching), swap=swap)


def step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    s.kv.check_integrity()
    s.update_from_output(out, ModelRunnerOutput(
        sampled={r.request_id: [SampledToken(7)] for r in out.requests if r.sample}))
    return out


def test_swap_out_and_back_in_exact_blocks_and_slots():
    swap = SwapManager(num_host_blocks=8, mode="swap")
    s = make(4, swap, prefix_caching=False)
    s.add_request(req("a", 8, 0.0, 0))    # 2 blocks
    s.add_request(req("b", 7, 1.0, 100))  # 2 blocks: the pool is full
    step(s)
    b_blocks = s.kv.block_ids("b")
    assert s.requests["b"].num_computed_tokens == 7
    out = step(s)  # a's decode needs a third block: b (latest) is swapped out
    assert out.preempted_ids == ["b"]
    assert out.swap_outs == [BlockCopy(b_blocks, [0, 1])]
    b = s.requests["b"]
    assert b.num_computed_tokens == 7 and swap.is_swapped("b") and not s.kv.holds_blocks("b")
    assert s.preemptions_by == {("kv_blocks", "swap"): 1} and b.num_preemptions == 1
    while "a" in s.requests:
        out = step(s)
    # a finished; b comes back with its 7 tokens: swap-in into fresh blocks, then a decode.
    out = step(s)
    (sr,) = out.requests
    assert sr.request_id == "b" and sr.start_pos == 7 and sr.token_ids == [b.all_token_ids[7]]
    assert out.swap_ins == [BlockCopy(s.kv.block_ids("b")[:2], [0, 1])]
    assert not swap.is_swapped("b")
    # The slots are released only at the next schedule (the step that reads them has run).
    assert swap.num_free_slots == 6
    swap.check_integrity()
    step(s)
    assert swap.num_free_slots == 8
    swap.check_integrity()


def test_resume_shares_cached_leading_blocks_and_copies_only_the_rest():
    swap = SwapManager(num_host_blocks=8, mode="swap")
    s = make(6, swap)
    s.add_request(req("a", 12, 0.0, 0, max_tokens=9))  # 3 blocks
    s.add_request(req("b", 10, 1.0, 100))              # 3 blocks (2 full, cached)
    step(s)
    out = step(s)
    assert out.preempted_ids == ["b"] and len(out.swap_outs[0].host_slots) == 3
    while "a" in s.requests:
        step(s)
    # a grew to 5 blocks (20 tokens computed) in the pool of 6, evicting one of b's two
    # cached full blocks; the other is still in the prefix cache.
    out = step(s)
    (copy,) = out.swap_ins
    table = s.kv.block_ids("b")
    assert s.kv.pool.cached.get(s.requests["b"].block_hashes[0]).block_id == table[0]  # shared, not copied
    assert copy == BlockCopy(table[1:3], [1, 2])  # the evicted full block and the partial one come back
    assert [(r.request_id, r.start_pos) for r in out.requests] == [("b", 10)]  # resumed with its 10 tokens


def test_no_host_room_falls_back_to_recompute_and_counts_it():
    swap = SwapManager(num_host_blocks=1, mode="swap")
    s = make(4, swap, prefix_caching=False)
    s.add_request(req("a", 8, 0.0, 0))
    s.add_request(req("b", 7, 1.0, 100))
    step(s)
    out = step(s)
    assert out.preempted_ids == ["b"] and out.swap_outs == []
    assert s.requests["b"].num_computed_tokens == 0
    assert s.preemptions_by == {("kv_blocks", "recompute"): 1}


def test_a_request_finished_while_swapped_frees_its_slots():
    swap = SwapManager(num_host_blocks=4, mode="swap")
    s = make(4, swap, prefix_caching=False)
    s.add_request(req("a", 8, 0.0, 0))
    s.add_request(req("b", 7, 1.0, 100))
    step(s)
    step(s)
    assert swap.num_free_slots == 2
    s.abort("b")
    swap.check_integrity()
    s.schedule()
    assert swap.num_free_slots == 4 and not swap.swapped


def test_cost_model_choice():
    # 1 KiB blocks of 4 tokens over 1 MB/s: swap = 2 ms per block; recompute 1 ms per token.
    cost = PreemptionCostModel(block_bytes=1000, block_size=4, link_bandwidth=1e6, flops_per_token=1e6,
                               peak_flops=1e9)
    assert cost.swap_s(3) == pytest.approx(0.006) and cost.recompute_s(10) == pytest.approx(0.01)
    auto = SwapManager(16, "auto", cost)
    assert auto.choose(10, 3) == "swap"        # 6 ms < 10 ms
    assert auto.choose(2, 3) == "recompute"    # 6 ms > 2 ms
    assert auto.choose(0, 0) == "recompute"
    with_attn = PreemptionCostModel(1000, 4, 1e6, 1e5, 1e9, attn_flops_per_pair=1e3)
    assert with_attn.recompute_s(100) == pytest.approx((100 * 1e5 + 5050 * 1e3) / 1e9)
    assert SwapManager(2, "swap").choose(10, 3) == "recompute"  # no room on the host
    assert SwapManager(16, "recompute").choose(10, 3) == "recompute"
    with pytest.raises(ValueError, match="preemption_mode"):
        SwapManager(4, "teleport")
    with pytest.raises(ValueError, match="cost model"):
        SwapManager(4, "auto")


def test_priority_displaces_a_less_important_running_request_by_swap():
    from kvserve.core.policies import PriorityPolicy

    swap = SwapManager(num_host_blocks=8, mode="swap")
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=64),
                  KVCacheManager(16, BS), policy=PriorityPolicy(), swap=swap)
    low = req("low", 6, 0.0, 0)
    low.priority = 5
    s.add_request(low)
    step(s)
    step(s)  # low: 6 prompt + 1 decode computed
    high = req("high", 5, 1.0, 100)
    high.priority = 0
    s.add_request(high)
    out = s.schedule()
    assert [r.request_id for r in out.requests] == ["high"] and out.preempted_ids == ["low"]
    assert out.swap_outs == [BlockCopy(out.swap_outs[0].block_ids, [0, 1])]  # 7 tokens: 2 blocks
    assert low.num_computed_tokens == 7 and s.preemptions_by == {("policy", "swap"): 1}
    s.kv.check_integrity()
    same = req("same", 5, 2.0, 200)
    same.priority = 0
    s.add_request(same)
    s.update_from_output(out, ModelRunnerOutput(sampled={"high": [SampledToken(7)]}))
    out = s.schedule()  # equal priority: no displacement
    assert out.preempted_ids == [] and [r.request_id for r in out.requests] == ["high"]
