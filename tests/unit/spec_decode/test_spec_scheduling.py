"""Speculation in the scheduler's step, on exact state (no model): which requests draft, how
many drafts fit the budget and the KV pool, rollback of rejected drafts (blocks trimmed, the
table resent whole), caps, finish/abort, and the online step-time model."""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import pytest

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.scheduler import Scheduler
from kvserve.protocol import ModelRunnerOutput, SampledToken
from kvserve.request import SLO, Request
from kvserve.sampling_params import SamplingParams
from kvserve.spec_decode.adaptive import LinearStepTime, SpecLengthPolicy
from kvserve.spec_decode.base import Proposer, ProposerState
from kvserve.spec_decode.manager import SpecDecodeManager
from kvserve.spec_decode.scheduling import SpecScheduling, slo_weights
from kvserve.spec_decode.step_time import OnlineStepTime, bucket, monotone_fit

BS = 4


class _State(ProposerState):
    def append(self, token_ids: Sequence[int]) -> None:
        self.token_ids.extend(token_ids)


class Sevens(Proposer):
    """Always proposes 7, 7, 7, ... (k of them)."""

    def new_state(self, prompt_token_ids, num_prompt_tokens: Optional[int] = None):
        s = _State(len(prompt_token_ids) if num_prompt_tokens is None else num_prompt_tokens)
        s.token_ids.extend(prompt_token_ids)
        return s

    def propose(self, state, k):
        return [7] * k


def make(budget: int = 64, blocks: int = 32, k: int = 4, max_model_len: int = 64) -> Scheduler:
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=max_model_len),
                  KVCacheManager(blocks, BS))
    s.spec = SpecScheduling(SpecDecodeManager(Sevens(), SpecLengthPolicy(k, adaptive=False)))
    return s


def prefill(s: Scheduler, rid: str, n: int, **sp) -> Request:
    return start(s, [(rid, n, sp)])[0]


def start(s: Scheduler, specs: list[tuple[str, int, dict]]) -> list[Request]:
    """Admit requests (id, prompt length, sampling options) and run their prefill in one step."""
    reqs = [Request(rid, list(range(10, 10 + n)), SamplingParams(**({"max_tokens": 20} | sp)), block_size=BS)
            for rid, n, sp in specs]
    for r in reqs:
        s.add_request(r)
    out = s.schedule()
    assert all(sr.sample and not sr.num_draft_tokens for sr in out.requests)
    s.update_from_output(out, ModelRunnerOutput(sampled={r.request_id: [SampledToken(1)] for r in reqs}))
    return reqs


def test_a_decode_gets_k_plus_one_positions_and_rejected_drafts_roll_back():
    s = make()
    r = prefill(s, "r", 6)  # 7 tokens, 6 computed
    out = s.schedule()
    (sr,) = out.requests
    assert sr.token_ids == [1, 7, 7, 7, 7] and list(sr.positions) == [6, 7, 8, 9, 10] and sr.sample
    assert sr.num_draft_tokens == 4 and out.num_batched_tokens == 5
    assert s.kv.num_request_blocks("r") == 3  # positions up to 10 need 3 blocks of 4
    # Only the first draft is accepted; the verifier's token is 5.
    s.update_from_output(out, ModelRunnerOutput(sampled={"r": [SampledToken(7), SampledToken(5)]},
                                                num_accepted={"r": 2}))
    assert r.output_token_ids == [1, 7, 5] and r.num_computed_tokens == 8 and r.num_tokens == 9
    assert s.kv.num_request_blocks("r") == 2  # the third block held only rejected KV: freed
    s.kv.check_integrity()
    out = s.schedule()
    (sr,) = out.requests
    assert list(sr.positions) == [8, 9, 10, 11, 12] and sr.token_ids == [5, 7, 7, 7, 7]
    assert sr.full_table and sr.block_ids == s.kv.block_ids("r")  # the shrunk table is resent whole
    m = s.spec.metrics
    assert (m.num_drafts, m.num_draft_tokens, m.num_accepted_tokens) == (1, 4, 1)


def test_all_accepted_keeps_every_block_and_sends_a_diff():
    s = make()
    r = prefill(s, "r", 6)
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput(sampled={"r": [SampledToken(7)] * 4 + [SampledToken(2)]},
                                                num_accepted={"r": 5}))
    assert r.num_computed_tokens == 11 and r.num_tokens == 12 and s.kv.num_request_blocks("r") == 3
    (sr,) = s.schedule().requests
    assert not sr.full_table and sr.start_pos == 11


def test_drafts_use_only_the_budget_left_after_prefills():
    s = make(budget=8)
    prefill(s, "a", 6)
    s.add_request(Request("b", list(range(50, 56)), SamplingParams(max_tokens=5), block_size=BS))
    out = s.schedule()
    by_id = {sr.request_id: sr for sr in out.requests}
    assert len(by_id["b"].token_ids) == 6  # the prefill is not delayed by speculation
    assert by_id["a"].num_draft_tokens == 1 and out.num_batched_tokens == 8


def test_drafts_never_preempt_when_blocks_run_short():
    s = make(blocks=3)
    start(s, [("a", 6, {}), ("b", 2, {})])  # 2 blocks + 1 block: the pool is full
    out = s.schedule()
    # No block to add: each drafts only into the free slots of its last block (a: 7, b: 3).
    assert [(sr.request_id, sr.num_draft_tokens) for sr in out.requests] == [("a", 1), ("b", 1)]
    assert s.num_preemptions == 0 and not out.preempted_ids


def test_caps_max_tokens_max_model_len_and_prompt_logprobs():
    s = make(max_model_len=12)
    # a: 1 token out of max_tokens 3, so 2 more: 1 draft + the verifier's token.
    # b: 9 tokens of max_model_len 12, so 3 more: 2 drafts + the verifier's token.
    start(s, [("a", 6, {"max_tokens": 3}), ("b", 8, {"max_tokens": 50})])
    out = s.schedule()
    assert {sr.request_id: sr.num_draft_tokens for sr in out.requests} == {"a": 1, "b": 2}
    s2 = make()
    r = Request("p", list(range(10, 16)), SamplingParams(max_tokens=5, prompt_logprobs=1), block_size=BS)
    s2.add_request(r)
    (sr,) = s2.schedule().requests
    assert sr.num_draft_tokens == 0  # the prompt's chunk never drafts


def test_finish_releases_state_and_an_abort_mid_step_is_not_observed():
    s = make()
    start(s, [("a", 6, {}), ("b", 6, {})])
    out = s.schedule()
    assert len(s.spec.manager) == 2
    s.abort("b")  # while the step runs
    s.update_from_output(out, ModelRunnerOutput(sampled={"a": [SampledToken(3)], "b": [SampledToken(3)]},
                                                num_accepted={"a": 1, "b": 1}))
    assert "b" not in s.spec.manager and len(s.spec.manager.policy.tracker) == 1
    s.abort("a")
    assert len(s.spec.manager) == 0 and len(s.spec.manager.policy.tracker) == 0
    s.kv.check_integrity()
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_online_step_time_is_flat_until_measured_then_interpolates():
    t = OnlineStepTime(window=3)
    assert t(1) == t(500) == 1.0
    t.observe(4, 0.10)
    assert t(1) == t(4) == t(400) == 0.10  # one size measured: optimistic elsewhere
    t.observe(8, 0.20)
    t.observe(8, 0.90)  # an outlier: the median of the window counts
    t.observe(8, 0.22)
    assert t(8) == pytest.approx(0.22) and t(6) == pytest.approx(0.16) and t(12) == pytest.approx(0.34)
    assert t(3) == pytest.approx(0.075) and t(1) == pytest.approx(0.025)  # never below n/4 of t(4)
    t.observe(2, 0.05)
    assert t(1) == pytest.approx(0.025)  # the first segment (2, 0.05)-(4, 0.10) extended
    assert t.has(8) and not t.has(5)
    t.observe(16, 0.15)  # cheaper than a smaller step: made non-decreasing, pooled by samples
    assert t(16) == t(8) == pytest.approx((3 * 0.22 + 0.15) / 4)


def test_online_step_time_one_slow_small_step_does_not_make_larger_steps_look_free():
    t = OnlineStepTime(window=16)
    for _ in range(16):
        t.observe(8, 0.033)
        t.observe(12, 0.038)
        t.observe(16, 0.045)
    t.observe(7, 0.080)  # measured once: a stall
    # A running max would read t(8) = t(12) = t(16) = 0.080: drafting would look free.
    assert t(8) == pytest.approx((0.080 + 16 * 0.033) / 17)  # pooled with the 16 samples of 8 tokens
    assert t(12) - t(8) > 0.002 and t(16) - t(12) == pytest.approx(0.007)


def test_monotone_fit_is_weighted_least_squares_non_decreasing():
    assert monotone_fit([1.0, 2.0, 3.0], [1, 1, 1]) == [1.0, 2.0, 3.0]
    assert monotone_fit([3.0, 1.0], [1, 3]) == [1.5, 1.5]
    assert monotone_fit([1.0, 5.0, 2.0, 4.0], [1, 1, 1, 1]) == [1.0, 3.5, 3.5, 4.0]
    assert bucket(3) == 3 and bucket(1000) == bucket(1010) and 900 < bucket(1000) < 1100


def test_an_unmeasured_no_draft_step_size_runs_without_drafts_first():
    s = make()
    st = OnlineStepTime()
    ticks = itertools.count()  # every step lasts one tick: extra tokens cost nothing, drafts pay
    s.spec = SpecScheduling(SpecDecodeManager(Sevens(), SpecLengthPolicy(4, step_time=st)), st,
                            clock=lambda: float(next(ticks)))
    r = prefill(s, "r", 6)  # measured: a step of 6 tokens
    assert st.has(6) and not st.has(1)
    out = s.schedule()
    assert out.requests[0].num_draft_tokens == 0  # a 1-token step was never measured: measure it
    s.update_from_output(out, ModelRunnerOutput(sampled={"r": [SampledToken(2)]}))
    assert st.has(1)
    assert s.schedule().requests[0].num_draft_tokens == 4
    assert r.num_tokens == 8


# ------------------------------------------------------------------ closed batch (LLM.generate)
def adaptive(s: Scheduler) -> None:
    """An adaptive policy on a step time where a few extra tokens are cheap (30 ms + 1 ms each)."""
    s.spec = SpecScheduling(SpecDecodeManager(Sevens(), SpecLengthPolicy(4, step_time=LinearStepTime(0.030, 0.001))))


def drafts_of(out) -> dict[str, int]:
    return {sr.request_id: sr.num_draft_tokens for sr in out.requests}


def test_open_batch_drafts_for_every_request_it_pays_for():
    s = make()
    adaptive(s)
    start(s, [("a", 6, {}), ("b", 6, {"max_tokens": 10})])
    d = drafts_of(s.schedule())
    assert d["a"] > 0 and d["b"] > 0


def test_closed_batch_drafts_only_for_the_requests_with_most_tokens_left_all_alike():
    s = make()
    adaptive(s)
    start(s, [("a", 6, {}), ("b", 6, {"max_tokens": 10}), ("c", 6, {})])
    s.closed_batch = True
    out = s.schedule()
    d = drafts_of(out)
    assert d["b"] == 0  # 9 tokens left against 19: drafting only makes it finish sooner
    assert d["a"] == d["c"] > 0  # tied for the most tokens left: one k for both
    s.update_from_output(out, ModelRunnerOutput(
        sampled={"a": [SampledToken(7)] * (d["a"] + 1), "b": [SampledToken(2)], "c": [SampledToken(2)]},
        num_accepted={"a": d["a"] + 1, "c": 1}))  # a took every draft, c none
    d = drafts_of(s.schedule())
    assert d == {"a": 0, "b": 0, "c": d["c"]} and d["c"] > 0  # c alone is the batch's end now


def test_closed_batch_without_drafts_when_a_critical_request_cannot_draft():
    s = make()
    adaptive(s)
    start(s, [("a", 6, {}), ("b", 6, {})])
    s.closed_batch = True
    s.add_request(Request("p", list(range(10, 50)), SamplingParams(max_tokens=20), block_size=BS))
    out = s.schedule()  # p's prefill (20 tokens left, a and b 19) runs in this step
    assert drafts_of(out) == {"a": 0, "b": 0, "p": 0}


# ------------------------------------------------------------------ SLO targets weigh drafts
def test_a_request_behind_its_tpot_target_gets_the_drafts_before_one_ahead():
    now = [0.0]
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                  KVCacheManager(32, BS), clock=lambda: now[0])
    # One more draft token costs 4 ms against a 30 ms step: with equal weights each request gets
    # the same drafts; 0.8 acceptance everywhere (the prior).
    s.spec = SpecScheduling(SpecDecodeManager(Sevens(), SpecLengthPolicy(4, step_time=LinearStepTime(0.030, 0.004))))
    reqs = [Request(rid, list(range(10, 16)), SamplingParams(max_tokens=20), block_size=BS,
                    slo=SLO(tpot_s=tpot)) for rid, tpot in (("late", 0.010), ("early", 1.0))]
    for r in reqs:
        s.add_request(r)
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput(sampled={r.request_id: [SampledToken(1)] for r in reqs}))
    now[0] = 0.05  # "late" is 4 of its targets behind (weight 4), "early" far ahead (0.5)
    assert slo_weights(s, reqs) == [4.0, 0.5]
    d = drafts_of(s.schedule())
    assert d["late"] > d["early"]


def test_slo_weights_are_none_without_targets_and_one_on_pace():
    now = [0.0]
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                  KVCacheManager(32, BS), clock=lambda: now[0])
    plain = Request("p", [1, 2, 3], SamplingParams(max_tokens=5), block_size=BS)
    paced = Request("q", [1, 2, 3], SamplingParams(max_tokens=5), block_size=BS, slo=SLO(tpot_s=0.1))
    assert slo_weights(s, [plain]) is None
    paced.first_token_time = 0.0
    paced.output_token_ids.extend([1, 2])  # 2 outputs: the next one is due at 0.2 s
    now[0] = 0.2
    assert slo_weights(s, [plain, paced]) == [1.0, pytest.approx(1.0)]
    now[0] = 0.25
    assert slo_weights(s, [plain, paced]) == [1.0, pytest.approx(1.5)]
