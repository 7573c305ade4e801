"""Exact-state scheduler tests with a fake model runner (no torch)."""
from __future__ import annotations

import pytest

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.scheduler import ModelRunnerOutput, SampledToken, Scheduler
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams

BS = 4


def make(num_blocks=16, budget=16, max_seqs=8, policy="fcfs", caching=True, max_model_len=256):
    kv = KVCacheManager(num_blocks, BS, caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     max_model_len=max_model_len, policy=policy), kv)


def req(rid, n_prompt, max_tokens=4, arrival=0.0, priority=0, start=0, **sp):
    return Request(rid, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens, **sp),
                   arrival_time=arrival, priority=priority, block_size=BS, eos_token_ids=frozenset({999}))


def run_step(s: Scheduler, token=7):
    out = s.schedule()
    s.kv.check_integrity()
    result = ModelRunnerOutput(sampled={r.request_id: [SampledToken(token)] for r in out.requests if r.sample})
    changed = s.update_from_output(out, result)
    s.kv.check_integrity()
    return out, changed


def plan(out):
    return [(r.request_id, len(r.token_ids), r.start_pos) for r in out.requests]


def test_chunked_prefill_under_budget_and_decodes_first():
    s = make(budget=10)
    s.add_request(req("a", 6, arrival=0))
    s.add_request(req("b", 12, arrival=1, start=100))
    out, _ = run_step(s)
    assert plan(out) == [("a", 6, 0), ("b", 4, 0)]  # b chunked to the budget
    out, _ = run_step(s)
    # a decodes first (1 token), then b continues its prefill with the rest of the budget.
    assert plan(out) == [("a", 1, 6), ("b", 8, 4)]
    assert out.requests[1].sample is True
    out, _ = run_step(s)
    assert plan(out) == [("a", 1, 7), ("b", 1, 12)]


def test_max_num_seqs_limits_admission():
    s = make(budget=100, max_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", 4, arrival=i, start=10 * i))
    out, _ = run_step(s)
    assert [r.request_id for r in out.requests] == ["r0", "r1"]
    assert s.num_waiting == 1


def test_finish_on_max_tokens_eos_and_stop_token():
    s = make()
    s.add_request(req("len", 3, max_tokens=2))
    s.add_request(req("eos", 3, max_tokens=10, start=100))
    s.add_request(req("stop", 3, max_tokens=10, start=200, stop_token_ids=[7]))
    out = s.schedule()
    res = ModelRunnerOutput(sampled={"len": [SampledToken(5)], "eos": [SampledToken(999)],
                                     "stop": [SampledToken(7)]})
    changed = {r.request_id: r for r in s.update_from_output(out, res)}
    assert changed["eos"].status == RequestStatus.FINISHED_STOPPED
    assert changed["stop"].status == RequestStatus.FINISHED_STOPPED and changed["stop"].stop_reason == 7
    assert changed["len"].status == RequestStatus.RUNNING
    out, changed = run_step(s)
    assert changed[0].status == RequestStatus.FINISHED_LENGTH
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_min_tokens_and_ignore_eos_suppress_eos_stop():
    s = make()
    s.add_request(req("m", 3, max_tokens=5, min_tokens=2))
    s.add_request(req("i", 3, max_tokens=5, start=50, ignore_eos=True))
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput(sampled={"m": [SampledToken(999)], "i": [SampledToken(999)]}))
    assert s.requests["m"].status == RequestStatus.RUNNING
    assert s.requests["i"].status == RequestStatus.RUNNING
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput(sampled={"m": [SampledToken(999)], "i": [SampledToken(999)]}))
    assert "m" not in s.requests  # 2 tokens out: EOS now stops it
    assert s.requests["i"].status == RequestStatus.RUNNING


def test_preemption_by_recompute_and_resume_from_cache():
    # 6 blocks of 4: two requests of 11 prompt tokens take 3 blocks each.
    s = make(num_blocks=6, budget=64)
    s.add_request(req("a", 11, max_tokens=8, arrival=0))
    s.add_request(req("b", 11, max_tokens=8, arrival=1, start=100))
    run_step(s)
    assert s.kv.num_free_blocks == 0
    out, _ = run_step(s)  # both reach 12 tokens: block 3 is full, no new block needed
    assert plan(out) == [("a", 1, 11), ("b", 1, 11)]
    out, _ = run_step(s)  # a needs a 4th block: b (latest arrival) is preempted
    assert out.preempted_ids == ["b"]
    assert plan(out) == [("a", 1, 12)]
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert s.kv.block_ids("b") == []
    assert b.num_preemptions == 1 and s.num_preemptions == 1
    # Finish a, then b resumes with its still-cached full blocks.
    while "a" in s.requests:
        run_step(s)
    out, _ = run_step(s)
    (sb,) = out.requests
    # a grew by two blocks after b was preempted; b's blocks were freed tail
    # first, so its two tail blocks were evicted and its first block survived.
    assert sb.request_id == "b" and sb.start_pos == 4
    # Everything after the cached block is recomputed, its two outputs included.
    assert sb.token_ids == list(range(104, 111)) + [7, 7]
    assert sb.sample


def test_prompt_that_can_never_fit_is_rejected():
    s = make(num_blocks=2)
    with pytest.raises(ValueError, match="KV blocks"):
        s.add_request(req("big", 20))
    s2 = make(max_model_len=10)
    with pytest.raises(ValueError, match="max_model_len"):
        s2.add_request(req("long", 10))
    with pytest.raises(ValueError, match="empty"):
        s2.add_request(req("empty", 0))


def test_max_model_len_finishes_with_length():
    s = make(max_model_len=6)
    s.add_request(req("a", 4, max_tokens=100))
    run_step(s)
    out, changed = run_step(s)
    assert changed[0].status == RequestStatus.FINISHED_LENGTH
    assert changed[0].num_tokens == 6


def test_priority_policy_orders_admission_and_preemption():
    s = make(budget=4, policy="priority")
    s.add_request(req("low", 4, priority=5, arrival=0))
    s.add_request(req("high", 4, priority=0, arrival=1, start=50))
    out, _ = run_step(s)
    assert [r.request_id for r in out.requests] == ["high"]
    # Victim choice: the lowest priority (largest value) is preempted.
    a, b = req("x", 1, priority=0, arrival=5), req("y", 1, priority=3, arrival=0)
    assert s.waiting.victim([a, b]) is b


def test_abort_frees_everything_waiting_or_running():
    s = make(budget=8)
    s.add_request(req("a", 8))
    s.add_request(req("b", 8, start=50))
    run_step(s)
    assert s.abort("a").status == RequestStatus.FINISHED_ABORTED
    assert s.abort("b").status == RequestStatus.FINISHED_ABORTED
    assert s.abort("b") is None
    s.kv.check_integrity()
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert not s.has_unfinished()
    out = s.schedule()
    assert set(out.finished_ids) == {"a", "b"}


def test_n_samples_fork_after_prompt_and_share_blocks():
    s = make(budget=64)
    r = req("g#0", 10, max_tokens=3)
    r.parent_id, r.num_samples_to_fork = "g", 3
    s.add_request(r)
    run_step(s)
    forks = s.new_forks
    assert [c.request_id for c in forks] == ["g#1", "g#2"]
    for c in forks:
        assert c.num_computed_tokens == 8  # two shared full blocks
        assert s.kv.block_ids(c.request_id)[:2] == s.kv.block_ids("g#0")[:2]
    out, _ = run_step(s)
    assert sorted(plan(out)) == [("g#0", 1, 10), ("g#1", 2, 8), ("g#2", 2, 8)]
