"""The `slo` policy on a fake clock: slack ordering, infeasible requests behind, the age
bound, TPOT-aware step budgets, rejection at arrival, victims, and the step-time model."""
from __future__ import annotations

import pytest

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.policies import AdmissionRejected
from kvserve.core.policies_slo import SLOPolicy, StepTimeModel
from kvserve.core.scheduler import Scheduler
from kvserve.protocol import ModelRunnerOutput, SampledToken
from kvserve.request import SLO, Request
from kvserve.sampling_params import SamplingParams

BS = 4
# 10 ms per step + 1 ms per token: a 90-token prompt takes 0.1 s in one chunk.
MODEL = dict(base_s=0.01, per_token_s=0.001)


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def req(rid: str, n: int, arrival: float, ttft: float | None = None, tpot: float | None = None,
        max_tokens: int = 2) -> Request:
    start = 1000 * (sum(map(ord, rid)) % 40)
    slo = SLO(ttft_s=ttft, tpot_s=tpot) if ttft or tpot else None
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens), arrival_time=arrival,
                   block_size=BS, slo=slo)


def policy(clock: Clock, **kw: object) -> SLOPolicy:
    return SLOPolicy(clock, StepTimeModel(**MODEL), **kw)  # type: ignore[arg-type]


def test_least_slack_first_with_the_prefill_time_counted():
    clock = Clock(100.0)
    p = policy(clock)
    long_ = req("long", 90, 100.0, ttft=0.5)    # slack 0.5 - 0.1 = 0.4
    short = req("short", 10, 100.0, ttft=0.35)  # slack 0.35 - 0.02 = 0.33
    loose = req("loose", 10, 99.0, ttft=5.0)    # slack 3.98
    none = req("none", 10, 98.0)                # no target: after every one with a target
    for r in (none, loose, long_, short):
        p.add(r)
    assert p.slack(long_, 100.0) == pytest.approx(0.4)
    assert p.slack(short, 100.0) == pytest.approx(0.33)
    assert [r.request_id for r in p] == ["short", "long", "loose", "none"]
    assert p.pop() is short and p.peek() is long_ and len(p) == 3


def test_a_request_that_can_no_longer_meet_its_ttft_goes_behind_the_feasible_ones():
    clock = Clock(100.0)
    p = policy(clock)
    late = req("late", 90, 99.0, ttft=1.05)  # deadline 100.05, prefill 0.1: slack -0.05
    ok = req("ok", 10, 100.0, ttft=10.0)
    p.add(late)
    p.add(ok)
    assert [r.request_id for r in p] == ["ok", "late"]
    # With no deadline-carrying rival it still runs (deprioritised, not dropped).
    p.pop()
    assert p.peek() is late


def test_age_bound_puts_the_oldest_first_whatever_its_slack():
    clock = Clock(100.0)
    p = policy(clock, max_wait_s=30.0)
    old = req("old", 10, 60.0)  # no target at all, waiting 40 s
    urgent = req("urgent", 10, 100.0, ttft=0.1)
    p.add(urgent)
    p.add(old)
    assert p.peek() is old
    clock.t = 80.0  # before the bound: the urgent one leads
    assert p.peek() is urgent


def decoding(rid: str, tpot: float, first_token_time: float, num_out: int) -> Request:
    r = req(rid, 8, first_token_time - 1.0, tpot=tpot, max_tokens=num_out + 10)
    r.num_computed_tokens = r.num_tokens - 1
    r.first_token_time = first_token_time
    r.output_token_ids = list(range(num_out))
    return r


def test_step_budget_keeps_the_tightest_tpot():
    clock = Clock(100.0)
    p = policy(clock, min_prefill_chunk=8)
    # First tokens just out: each may spend one TPOT on its next token.
    d1 = decoding("d1", 0.05, 100.0, 1)
    d2 = decoding("d2", 0.03, 100.0, 1)
    pre = req("pre", 200, 100.0)
    assert p.step_token_budget([pre], 2048) == 2048  # nobody with a TPOT target is decoding
    # 0.03 s holds (0.03 - 0.01) / 0.001 = 20 tokens.
    assert p.step_token_budget([d1, d2, pre], 2048) == 20
    assert p.step_token_budget([d1, d2, pre], 16) == 16
    tight = decoding("tight", 0.011, 100.0, 1)  # room for 1 token: decodes + min chunk instead
    # The floor is the larger of min_prefill_chunk (8) and the tokens one step's fixed time buys
    # (0.01 / 0.001 = 10), so a TPOT-bound step is still at least half spent on tokens.
    assert p.prefill_floor() == 10
    assert p.step_token_budget([d1, d2, tight], 2048) == 3 + 10
    behind = decoding("behind", 0.05, 99.0, 10)  # 10 tokens in 1 s: due at 99.5, already late
    behind.sampling_params.max_tokens = 100  # 90 tokens left to make up the 0.5 s: savable
    assert p.step_token_budget([d1, behind, pre], 2048) == 2 + 10
    assert policy(clock, min_prefill_chunk=32).prefill_floor() == 32


def test_step_budget_spends_the_time_a_request_is_ahead_of_its_mean_tpot():
    """TPOT is a mean over the request: 60 tokens in 1 s at a 30 ms target leave 0.8 s banked
    (due at 99 + 60 x 0.03 = 100.8), which one long prefill chunk may spend."""
    clock = Clock(100.0)
    p = policy(clock, min_prefill_chunk=8)
    ahead = decoding("ahead", 0.03, 99.0, 60)
    assert p.tpot_spare_s(ahead, 100.0) == pytest.approx(0.8)
    assert p.step_token_budget([ahead, req("pre", 2000, 100.0)], 2048) == 790  # (0.8 - 0.01) / 0.001
    clock.t = 100.7  # the bank runs down as time passes without a token
    assert p.step_token_budget([ahead], 2048) == 90


def test_scheduler_chunks_a_long_prompt_to_keep_tpot():
    clock = Clock(100.0)
    p = policy(clock, min_prefill_chunk=4)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=512),
                  KVCacheManager(128, BS), policy=p, clock=clock)
    s.add_request(req("chat", 8, 100.0, ttft=1.0, tpot=0.02, max_tokens=20))
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput(sampled={"chat": [SampledToken(5)]}))
    s.add_request(req("doc", 300, 100.0))  # would take 300 tokens in one step
    out = s.schedule()
    # 0.02 s fits (0.02 - 0.01) / 0.001 = 10 tokens; the floor is the decode and 10 prompt tokens.
    assert {r.request_id: len(r.token_ids) for r in out.requests} == {"chat": 1, "doc": 10}


def test_reject_refuses_an_unreachable_ttft_at_arrival():
    clock = Clock(100.0)
    p = policy(clock, reject=True)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=512),
                  KVCacheManager(256, BS), policy=p, clock=clock)
    s.add_request(req("q1", 400, 100.0, ttft=0.5))  # 0.41 s of prefill, slack 0.09
    # slack 0.18: behind q1, so its first token comes after 0.42 s of prefill > 0.2 s.
    with pytest.raises(AdmissionRejected, match="time-to-first-token") as info:
        s.add_request(req("tight", 10, 100.0, ttft=0.2))
    assert info.value.retry_after_s >= 1.0
    assert "tight" not in s.requests and p.num_rejected == 1
    s.add_request(req("fine", 10, 100.0, ttft=2.0))  # 0.42 s < 2 s
    s.add_request(req("first", 10, 100.0, ttft=0.05))  # slack 0.03 < q1's: it goes first, and makes it
    s.add_request(req("untargeted", 10, 100.0))
    assert len(s.waiting) == 4 and s.waiting.peek().request_id == "first"
    off = policy(clock)  # without reject nothing is refused
    off.check_admission(req("tight", 10, 100.0, ttft=0.001))


def test_victim_has_the_latest_next_deadline():
    clock = Clock(100.0)
    p = policy(clock)
    decoding = req("dec", 8, 90.0, tpot=0.1)
    decoding.first_token_time = 99.0
    decoding.output_token_ids = [1, 2, 3]  # next token due at 99.3
    waiting_first = req("pre", 8, 99.0, ttft=2.0)  # due at 101
    no_target = req("batch", 8, 50.0)
    assert p.victim([decoding, waiting_first, no_target]) is no_target
    assert p.victim([decoding, waiting_first]) is waiting_first


def test_step_time_model_refits_from_observed_steps():
    m = StepTimeModel(base_s=0.5, per_token_s=0.5, min_observations=4)
    for n in (1, 10, 50, 100, 200, 7, 64, 300):
        m.observe_step(n, 0.002 + 3e-5 * n)
    assert m.base_s == pytest.approx(0.002, rel=1e-6) and m.per_token_s == pytest.approx(3e-5, rel=1e-6)
    same = StepTimeModel(base_s=0.5, per_token_s=0.5, min_observations=2)
    for _ in range(5):
        same.observe_step(16, 0.01)  # one step size only: the slope is unknown, kept
    assert same.per_token_s == 0.5
    assert m.tokens_within(0.002 + 3e-5 * 100 + 1e-9) == 100
    with pytest.raises(ValueError):
        StepTimeModel(per_token_s=0)


def test_displace_gives_a_feasible_head_the_seat_of_a_request_with_nothing_to_lose():
    clock = Clock(100.0)
    p = policy(clock)
    batch = req("batch", 8, 90.0, ttft=20.0)  # TTFT target met, no TPOT: nothing to lose
    batch.first_token_time, batch.output_token_ids = 91.0, [1, 2]
    chat = decoding("chat", 0.1, 99.0, 3)  # decoding against a TPOT target
    head = req("head", 10, 100.0, ttft=1.0)
    assert p.displace(head, [chat, batch]) is batch
    assert p.displace(head, [chat]) is None  # never stall a TPOT-bound decode
    assert p.displace(req("untargeted", 10, 100.0), [batch]) is None  # no deadline: it waits
    late = req("late", 90, 98.0, ttft=1.0)  # due 99.0: past
    assert p.displace(late, [batch]) is None  # it cannot make it: a seat gains nothing
    assert p.displace(head, []) is None
    batch.num_preemptions = 1  # displaced once already: it keeps its seat now
    assert p.displace(head, [chat, batch]) is None


def test_displace_takes_a_prefilling_seat_only_when_its_deadline_survives_the_redo():
    clock = Clock(100.0)
    p = policy(clock)
    head = req("head", 10, 100.0, ttft=1.0)  # due 101.0
    # 90 tokens redo in 0.1 s: due at 101.05 leaves 0.05 s after the head's deadline (< 0.1 s).
    close = req("close", 90, 99.0, ttft=2.05)
    assert p.displace(head, [close]) is None
    far = req("far", 90, 99.0, ttft=20.0)  # due 119.0: 18 s to spare
    assert p.displace(head, [close, far]) is far


def test_scheduler_preempts_a_finished_ttft_seat_for_a_tight_head():
    clock = Clock(100.0)
    p = policy(clock)
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=512, max_model_len=512),
                  KVCacheManager(128, BS), policy=p, clock=clock)
    for rid, arrival in (("b1", 99.9), ("b2", 100.0)):
        s.add_request(req(rid, 8, arrival, ttft=20.0, max_tokens=50))
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput(sampled={"b1": [SampledToken(5)], "b2": [SampledToken(6)]}))
    clock.t = 100.2
    s.add_request(req("chat", 8, 100.2, ttft=1.0, max_tokens=5))
    out = s.schedule()
    assert out.preempted_ids == ["b2"]  # both have nothing to lose: the later arrival goes
    assert {r.request_id for r in out.requests} == {"b1", "chat"}
    assert s.preemptions_by[("policy", "recompute")] == 1
    assert s.requests["b2"].num_preemptions == 1
    # The fcfs scheduler leaves the head waiting for a seat instead.
    f = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=512, max_model_len=512),
                  KVCacheManager(128, BS), clock=clock)
    for rid in ("b1", "b2"):
        f.add_request(req(rid, 8, 100.0, ttft=20.0, max_tokens=50))
    out = f.schedule()
    f.update_from_output(out, ModelRunnerOutput(sampled={"b1": [SampledToken(5)], "b2": [SampledToken(6)]}))
    f.add_request(req("chat", 8, 100.2, ttft=1.0, max_tokens=5))
    assert {r.request_id for r in f.schedule().requests} == {"b1", "b2"}


def test_step_budget_ignores_tpots_that_can_no_longer_count():
    clock = Clock(100.0)
    p = policy(clock, min_prefill_chunk=8)
    tight = decoding("tight", 0.02, 100.0, 1)  # on pace: 0.02 s to spare -> 10 tokens, floor 1 + 10
    assert p.step_token_budget([tight], 2048) == 11
    # Its first token came 3 s after arrival against a 1 s TTFT: the SLO is lost already.
    missed = decoding("missed", 0.02, 100.0, 1)
    missed.arrival_time, missed.slo = 97.0, SLO(ttft_s=1.0, tpot_s=0.02)
    assert not p.tpot_savable(missed, 100.0, p.model.step_s(1))
    assert p.step_token_budget([missed], 2048) == 2048
    # 1 s behind with 5 tokens left: even 11 ms steps gain 9 ms a token, 45 ms in all.
    behind = decoding("behind", 0.02, 98.0, 51)  # due 98 + 51 x 0.02 = 99.02: 0.98 s late
    behind.sampling_params.max_tokens = 56
    assert not p.tpot_savable(behind, 100.0, p.model.step_s(1))
    roomy = decoding("roomy", 0.05, 100.0, 1)  # 0.05 s to spare: (0.05 - 0.01) / 0.001 = 40 tokens
    assert p.step_token_budget([behind, roomy], 2048) == 40  # only the savable one counts
    behind.sampling_params.max_tokens = 51 + 200  # 200 tokens left: 1.8 s to gain, savable
    assert p.tpot_savable(behind, 100.0, p.model.step_s(1))
    assert p.step_token_budget([behind, roomy], 2048) == 2 + 10  # its deficit holds the step to the floor
