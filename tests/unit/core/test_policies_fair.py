"""The `fair` policy (Virtual Token Counter): exact counters, the counter lift, weights,
victims, and the latency bound for a light tenant next to a flooding one."""
from __future__ import annotations

import pytest

from kvserve.config import SchedulerConfig, parse_tenant_weights
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.policies import make_policy
from kvserve.core.policies_fair import VTCPolicy
from kvserve.core.scheduler import Scheduler
from kvserve.protocol import ModelRunnerOutput, SampledToken
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams

BS = 4


def req(rid: str, n: int, tenant: str, arrival: float, max_tokens: int = 2) -> Request:
    start = 1000 * (hash(rid) % 50)
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens), arrival_time=arrival,
                   block_size=BS, tenant=tenant)


def sched(policy: VTCPolicy, max_num_seqs: int = 1, blocks: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, max_model_len=64),
                     KVCacheManager(blocks, BS), policy=policy)


def step(s: Scheduler) -> list[str]:
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput(
        sampled={r.request_id: [SampledToken(7)] for r in out.requests if r.sample}))
    s.kv.check_integrity()
    return [r.request_id for r in out.requests]


def run(s: Scheduler) -> list[str]:
    admitted: list[str] = []
    while s.has_unfinished():
        admitted += [rid for rid in step(s) if rid not in admitted]
    return admitted


def test_counters_charge_prompts_at_admission_and_decodes_when_scheduled():
    p = VTCPolicy(w_prefill=1.0, w_decode=2.0)
    s = sched(p)
    s.add_request(req("a0", 6, "a", 0.0, max_tokens=3))
    assert p.counters == {"a": 0.0}
    assert step(s) == ["a0"]  # prefill: 6 prompt tokens charged when admitted
    assert p.counters == {"a": 6.0}
    step(s)
    step(s)  # two decodes
    assert p.counters == {"a": 10.0}
    assert not s.has_unfinished()


def test_weights_divide_the_charge():
    p = VTCPolicy(tenant_weights={"a": 2.0})
    s = sched(p, max_num_seqs=2)
    s.add_request(req("a0", 8, "a", 0.0, max_tokens=2))
    s.add_request(req("b0", 8, "b", 0.0, max_tokens=2))
    run(s)
    assert p.counters == {"a": (8 + 2) / 2, "b": 8 + 2.0}


def test_a_newly_active_tenant_is_lifted_to_the_least_waiting_counter():
    p = VTCPolicy()
    p.counters = {"a": 50.0, "b": 30.0, "c": 5.0}
    p.add(req("b1", 4, "b", 2.0))  # nobody waits, nobody was served: kept
    assert p.counters["b"] == 30.0
    p.add(req("a1", 4, "a", 1.0))  # above the floor (b's 30): kept
    assert p.counters["a"] == 50.0
    p.add(req("c1", 4, "c", 3.0))  # c was idle: no credit for it, lifted to min(a, b) waiting
    assert p.counters["c"] == 30.0
    p.add(req("c2", 4, "c", 4.0))  # c already has a waiting request: no lift
    assert p.counters["c"] == 30.0
    # Service order: b (30, earlier) then c (30), then a.
    assert [r.request_id for r in p] == ["b1", "c1", "c2", "a1"]
    p.counters["d"] = 100.0
    p.add(req("d1", 4, "d", 5.0))  # above the floor: kept
    assert p.counters["d"] == 100.0


def test_lift_with_nobody_waiting_uses_the_tenant_served_last():
    p = VTCPolicy()
    p.add(req("a1", 4, "a", 0.0))
    assert p.pop().request_id == "a1" and p.counters == {"a": 4.0}
    p.add(req("b1", 4, "b", 1.0))  # nobody waits: lifted to a's counter (a was served last)
    assert p.counters["b"] == 4.0


def test_victim_is_from_the_most_served_tenant():
    p = VTCPolicy()
    p.counters = {"a": 10.0, "b": 40.0}
    p.service = dict(p.counters)
    a, b1, b2 = req("a", 4, "a", 5.0), req("b1", 4, "b", 1.0), req("b2", 4, "b", 2.0)
    assert p.victim([a, b1, b2]) is b2


def test_preempted_requests_go_back_to_the_front_of_their_tenant_and_are_not_recharged():
    p = VTCPolicy()
    r1, r2 = req("a1", 4, "a", 0.0), req("a2", 4, "a", 1.0)
    p.add(r1)
    p.add(r2)
    assert p.pop() is r1 and p.counters["a"] == 4.0
    p.add_preempted(r1)
    assert p.peek() is r1 and len(p) == 2
    assert p.pop() is r1 and p.counters["a"] == 4.0  # its prompt was charged once
    p.remove(r2)
    assert len(p) == 0 and p.peek() is None


def test_a_flooding_tenant_delays_a_light_one_by_at_most_one_request():
    """Tenant a floods (12 requests at t=0), b sends one request after a got service.
    FCFS serves b last; VTC serves it right after the request a is running."""
    def workload(s: Scheduler) -> None:
        for i in range(12):
            s.add_request(req(f"a{i}", 8, "a", 0.0 + i * 1e-3))

    fcfs = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=64),
                     KVCacheManager(64, BS))
    workload(fcfs)
    step(fcfs)
    fcfs.add_request(req("b0", 8, "b", 1.0))
    assert run(fcfs)[-1] == "b0"

    p = VTCPolicy()
    fair = sched(p)
    workload(fair)
    step(fair)  # a0 admitted: a's counter 8 (its prompt); nobody else waits
    fair.add_request(req("b0", 8, "b", 1.0))  # lifted to min(waiting) = a's 8.0
    assert p.counters["b"] == 8.0
    order = run(fair)
    # a0 was running; b0 ties with a at 8.0 and goes first (round-robin on ties: a was served
    # last): bounded, not 12 requests late.
    assert order.index("b0") == 1, order


def test_registry_and_weights_parsing():
    p = make_policy("fair", tenant_weights={"x": 3.0})
    assert isinstance(p, VTCPolicy) and p.weight("x") == 3.0 and p.weight("y") == 1.0
    assert parse_tenant_weights("a=2, b=0.5") == {"a": 2.0, "b": 0.5}
    for bad in ("a", "a=0", "=1", "a=x"):
        with pytest.raises(ValueError, match="tenant weights"):
            parse_tenant_weights(bad)
    assert SchedulerConfig(policy="fair", tenant_weights="a=2").policy_options()["tenant_weights"] == {"a": 2.0}


def test_with_every_seat_taken_a_far_behind_tenant_displaces_the_most_served():
    p = VTCPolicy(displace_threshold=10.0)
    s = sched(p, max_num_seqs=1)
    s.add_request(req("a0", 8, "a", 0.0, max_tokens=20))
    step(s)
    for _ in range(5):
        step(s)  # a: 8 + 2 * 5 = 18
    assert p.counters["a"] == 18.0
    s.add_request(req("b0", 4, "b", 1.0))  # lifted to nothing (nobody waits): last served a -> 18
    assert p.counters["b"] == 18.0
    assert step(s) == ["a0"]  # counters equal: no displacement, b waits for the seat
    p.counters["b"] = 0.0  # b far behind (e.g. a weight): it takes the seat now
    out = s.schedule()
    assert [r.request_id for r in out.requests] == ["b0"] and out.preempted_ids == ["a0"]
    assert s.preemptions_by == {("policy", "recompute"): 1}
    s.kv.check_integrity()


def test_a_tenant_below_its_seat_share_takes_a_seat_from_the_one_most_over():
    p = VTCPolicy(tenant_weights={"b": 3.0})
    run_ = [req(f"a{i}", 4, "a", float(i)) for i in range(4)]
    # a holds all 4 seats; b (weight 3 of 4) is due 3: it takes a's latest seat.
    assert p.displace(req("b0", 4, "b", 9.0), run_) is run_[3]
    # b holding 3 of 4 seats: its share, no displacement; nor for a third tenant's head at
    # less than a whole seat below its share (1/5 of 4 seats = 0.8).
    mixed = [run_[0]] + [req(f"b{i}", 4, "b", 5.0 + i) for i in range(3)]
    assert p.displace(req("b9", 4, "b", 9.0), mixed) is None
    assert p.displace(req("c0", 4, "c", 9.0), mixed) is None
    assert p.displace(req("a9", 4, "a", 9.0), run_) is None  # same tenant


def test_running_prefill_chunks_go_least_served_tenant_first_after_the_decodes():
    p = VTCPolicy(protect_prefill=False)
    p.counters = {"a": 50.0, "b": 10.0}
    a_dec, a_pre, b_pre = req("ad", 4, "a", 0.0), req("ap", 8, "a", 1.0), req("bp", 8, "b", 2.0)
    a_dec.num_computed_tokens = 4  # one token left: a decode
    assert p.order_running([a_pre, b_pre, a_dec]) == [a_dec, b_pre, a_pre]


def _flood_then_light(protect: bool) -> tuple[list[int], float, list[str]]:
    """Tenant a fills all 4 seats with long prompts (chunked, budget 32); b sends one
    20-token prompt.  Fake clock: a step costs 1 + 0.1 per token.  Returns the batched
    tokens of the steps after b's arrival, b's TTFT and the ids of the step that ran b."""
    now = [0.0]
    p = VTCPolicy(clock=lambda: now[0], protect_prefill=protect)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128),
                  KVCacheManager(256, BS), policy=p, clock=lambda: now[0])
    for i in range(8):  # distinct prompts (no prefix-cache hits between them)
        s.add_request(Request(f"a{i}", list(range(100 * i, 100 * i + 60)), SamplingParams(max_tokens=30),
                              arrival_time=0.0, block_size=BS, tenant="a"))
    for _ in range(6):
        out = s.schedule()
        now[0] += 1 + 0.1 * out.num_batched_tokens
        s.update_from_output(out, ModelRunnerOutput(sampled={r.request_id: [SampledToken(7)]
                                                             for r in out.requests if r.sample}))
    b = Request("b0", list(range(5000, 5020)), SamplingParams(max_tokens=2), arrival_time=now[0], block_size=BS,
                tenant="b")
    s.add_request(b)
    sizes: list[int] = []
    ran: list[str] = []
    while b.first_token_time is None:
        out = s.schedule()
        sizes.append(out.num_batched_tokens)
        if any(r.request_id == "b0" for r in out.requests):
            ran = [r.request_id for r in out.requests]
        now[0] += 1 + 0.1 * out.num_batched_tokens
        s.update_from_output(out, ModelRunnerOutput(sampled={r.request_id: [SampledToken(7)]
                                                             for r in out.requests if r.sample}))
        s.kv.check_integrity()
    return sizes, b.first_token_time - b.arrival_time, ran


def test_a_light_tenants_prompt_runs_in_a_short_step_of_its_own():
    """b, below its seat share, takes a seat (displacement) and its prompt runs at once in a
    step cut to the decodes plus its 20 tokens, a's prefill chunks sitting it out: its TTFT
    (1 + 0.1 * (decodes + 20)) stays within 2x of its TTFT alone (1 + 0.1 * 20 = 3.0)."""
    sizes, ttft, ran = _flood_then_light(protect=True)
    assert len(sizes) == 1  # first token in the first step after it arrived
    decodes = [rid for rid in ran if rid != "b0"]
    assert sizes[0] == len(decodes) + 20  # the decodes and b's whole prompt, no chunk of a's
    assert ttft == pytest.approx(1 + 0.1 * sizes[0])
    assert ttft <= 2 * 3.0
    # Without protection a's chunks fill the step first and b waits or shares a full step.
    sizes_off, ttft_off, _ = _flood_then_light(protect=False)
    assert sizes_off[-1] == 32 or len(sizes_off) > 1
    assert ttft_off > 2 * 3.0


def test_no_protection_with_one_tenant_or_at_its_share():
    p = VTCPolicy()
    a = [req(f"a{i}", 8, "a", float(i)) for i in range(4)]
    assert p._protected(a) == set()  # one tenant, all prefilling: nothing to protect
    assert p.step_token_budget(a, 32) == 32
    b = [req(f"b{i}", 8, "b", 5.0 + i) for i in range(2)]
    mixed = a[:2] + b
    assert p._protected(mixed) == set()  # 2 seats each: both at their share
    assert p.order_running(mixed) == mixed  # counters equal: admission order kept


def test_ties_go_to_the_tenant_served_longest_ago():
    p = VTCPolicy()
    a1, a2, b1 = req("a1", 4, "a", 0.0), req("a2", 4, "a", 0.1), req("b1", 4, "b", 5.0)
    p.add(a1)
    p.add(a2)
    assert p.pop() is a1  # a: 4
    p.add(b1)  # lifted to a's 4.0: a tie; b never served, so it goes before a's earlier a2
    assert p.counters == {"a": 4.0, "b": 4.0}
    assert [r.request_id for r in p] == ["b1", "a2"]
    assert p.pop() is b1 and p.pop() is a2


def test_a_tenant_below_its_seat_share_is_admitted_first_and_keeps_its_seats():
    p = VTCPolicy(displace_threshold=10.0)
    running = [req(f"a{i}", 4, "a", float(i)) for i in range(3)] + [req("b0", 4, "b", 0.5)]
    for r in running:
        r.num_computed_tokens = 4  # decoding
    a9, b1 = req("a9", 4, "a", 1.0), req("b1", 4, "b", 8.0)
    p.add(a9)
    p.add(b1)
    p.counters = {"a": 100.0, "b": 105.0}  # b was just charged a prompt
    p.service = dict(p.counters)
    assert p.peek() is a9  # counters alone: a first
    p.step_token_budget(running, 64)  # the step starts: b holds 1 of 4 seats, a whole seat below its 2
    assert p._protected_now == {"b"}
    assert p.peek() is b1 and [r.request_id for r in p] == ["b1", "a9"]
    assert p.displace(b1, running) is running[2]  # from a, the tenant over its share
    # b's new seat counts in the shares for the rest of the step: b1 popped (admitted), b's
    # next request is at its share (2 of 4) and displaces nobody.
    assert p.pop() is b1
    b2 = req("b2", 4, "b", 9.0)
    assert p.displace(b2, running[:2] + running[3:]) is None
    # b far ahead in service (by more than the threshold): no seats out of turn, and a's head
    # still may not take b's seat through the counter lead while b is below its seat share.
    p.counters = {"a": 100.0, "b": 150.0}
    p.service = dict(p.counters)
    p.step_token_budget(running, 64)
    assert p._protected_now == set() and p.displace(b2, running) is None
    assert p.displace(a9, running) is None


def test_the_lift_leaves_service_up_to_lift_credit_below_the_floor():
    p = VTCPolicy(lift_credit=100.0)
    p.add(req("a1", 4, "a", 0.0))
    p.counters["a"] = p.service["a"] = 500.0
    p.add(req("b1", 40, "b", 1.0))  # b idle until now: counter lifted to a's 500, service to 400
    assert (p.counters["b"], p.service["b"]) == (500.0, 400.0)
    assert p.pop().request_id == "a1" and p.pop().request_id == "b1"  # prompts go on both
    assert (p.counters["b"], p.service["b"]) == (540.0, 440.0)
    p.service["b"] = 0.0
    p.add(req("b2", 4, "b", 2.0))  # lifted again (to b's own, the last served): never more
    assert (p.counters["b"], p.service["b"]) == (540.0, 440.0)  # than lift_credit below it


def test_a_light_tenant_ahead_only_through_the_lift_keeps_its_protection_and_seats():
    """The weight-2 miss: a light tenant below its seat share, lifted level with the flooding
    one at each new request and charged its prompts, led the flooding tenant's (weighted, slow)
    counter by more than displace_threshold, so it lost its protection and even its seats to
    the counter-lead displacement.  Its service (bounded lift credit) does not lead."""
    p = VTCPolicy(tenant_weights={"heavy": 2.0}, displace_threshold=100.0, lift_credit=300.0)
    running = [req(f"h{i}", 4, "heavy", float(i)) for i in range(5)] + [req("l0", 4, "light", 0.5)]
    for r in running:
        r.num_computed_tokens = 4  # decoding
    p.add(req("h9", 4, "heavy", 1.0))
    p.counters["heavy"] = p.service["heavy"] = 1000.0
    l1 = req("l1", 4, "light", 8.0)
    p.add(l1)  # lifted to heavy's 1000, service to 700
    p.counters["light"] += 250.0  # then charged prompts: 250 ahead of heavy's counter
    p.service["light"] += 250.0
    assert p.counters["light"] - p.counters["heavy"] > p.displace_threshold
    p.step_token_budget(running, 64)  # light: 1 of 6 seats, share 2: a whole seat below
    assert p._protected_now == {"light"} and p.peek() is l1
    assert p.displace(l1, running) is running[4]  # heavy's latest seat
    # Light's seat is not the counter-lead victim either (nor under KV pressure): the most
    # served tenant is heavy.
    assert p.victim(running).tenant == "heavy"
    assert p.displace(req("h10", 4, "heavy", 9.0), running) is None
    # Past the credit, light is ahead in service too: no seats out of turn.
    p.service["light"] = p.counters["light"]
    p.step_token_budget(running, 64)
    assert p._protected_now == set()


def test_decode_steps_are_charged_with_their_drafts_and_recomputes_are_not():
    p = VTCPolicy(w_prefill=1.0, w_decode=2.0)
    r = req("a0", 6, "a", 0.0, max_tokens=8)
    p.add(r)
    p.pop()
    assert p.counters["a"] == 6.0
    p.on_scheduled(r, 6)  # the prompt: charged at admission, not again
    assert p.counters["a"] == 6.0
    r.num_computed_tokens = 6
    r.append_output_token(7)
    p.on_scheduled(r, 1)  # a decode
    assert p.counters["a"] == 8.0
    p.on_scheduled(r, 4)  # a decode with 3 drafts (speculative decoding): 4 positions
    assert p.counters["a"] == 16.0
    r.append_output_token(7)
    r.num_computed_tokens = 0  # preempted by recompute: prompt and outputs computed again
    p.on_scheduled(r, 6)
    r.num_computed_tokens = 6
    p.on_scheduled(r, 1)  # a recomputed output position (not the last token): not charged
    assert p.counters["a"] == 16.0


def test_while_tenants_compete_a_step_is_cut_to_what_takes_contended_step_s():
    """On a CPU a full step of prompts lasts seconds, and another tenant's request arriving
    during it waits it out: with two tenants active the step holds what the measured step
    time (here 30 ms + 1 ms per token) fits in contended_step_s."""
    p = VTCPolicy(contended_step_s=0.2)
    for n in (8, 16, 32, 64, 128, 256, 512, 8, 16, 32):
        p.observe_step(n, 0.030 + 0.001 * n)
    a = [req(f"a{i}", 400, "a", float(i)) for i in range(2)]  # two long prompts, prefilling
    assert p.step_token_budget(a, 2048) == 2048  # one tenant: nobody else waits for the step
    b = req("b0", 8, "b", 3.0)
    b.num_computed_tokens = b.num_prompt_tokens
    b.output_token_ids.append(7)  # seated and decoding: b is active, with no prompt work
    assert p._protected(a + [b]) == set()
    assert p.step_token_budget(a + [b], 2048) == 170  # (0.2 - 0.030) / 0.001
    assert VTCPolicy(contended_step_s=0).step_token_budget(a + [b], 2048) == 2048  # off
    # Never below twice the decodes' own step: 201 decodes (b and 200 more) take 0.231 s, so the step
    # may take 0.462 s = 432 tokens (else prompts would crawl in a few tokens a step).
    many = [req(f"d{i}", 8, "c", 4.0 + i) for i in range(200)]
    for r in many:
        r.num_computed_tokens = r.num_prompt_tokens
        r.output_token_ids.append(7)
    assert p.step_token_budget(a + [b] + many, 2048) == 432
    with pytest.raises(ValueError):
        VTCPolicy(contended_step_s=-1.0)
