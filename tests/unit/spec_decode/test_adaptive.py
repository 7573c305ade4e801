"""Adaptive speculation length: exact optimum, load behaviour, acceptance tracking."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from kvserve.spec_decode.adaptive import (
    AcceptanceTracker, InterpolatedStepTime, LinearStepTime, SpecLengthPolicy, choose_joint_length,
    choose_spec_lengths, expected_tokens, fit_linear_step_time, roofline_step_time,
)


def goodput(ks, rates, t, base=0, draft_token_s=0.0, draft_fixed_s=0.0, weights=None):
    w = weights or [1.0] * len(ks)
    s = sum(ks)
    time = t(base + len(ks) + s) + (draft_fixed_s if s else 0.0) + draft_token_s * s
    return sum(wi * expected_tokens(r, k) for wi, r, k in zip(w, rates, ks)) / time


def test_expected_tokens():
    assert expected_tokens([0.5, 0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens([1.0, 0.0, 1.0], 3) == 2.0  # nothing after a certain rejection


def test_hand_computed_single_request():
    # t(n) = 1 + n; rates 0.9: goodput(k) = E(k) / (2 + k) = .5, .633, .6775, .6878, .6825 -> k = 3
    assert choose_spec_lengths([[0.9] * 4], [4], LinearStepTime(1.0, 1.0)) == [3]
    # Low acceptance: E(1) / 3 = 1.1 / 3 < 1 / 2 -> off.
    assert choose_spec_lengths([[0.1] * 4], [4], LinearStepTime(1.0, 1.0)) == [0]


def test_matches_brute_force():
    rng = random.Random(0)
    for trial in range(300):
        B = rng.randint(1, 3)
        caps = [rng.randint(0, 3) for _ in range(B)]
        rates = [sorted((rng.random() for _ in range(3)), reverse=rng.random() < 0.5) for _ in range(B)]
        if rng.random() < 0.5:
            t = LinearStepTime(rng.uniform(0, 2), rng.uniform(0.01, 1))
        else:  # roofline-like: flat while memory-bound, then linear
            a, b = rng.uniform(0.5, 2), rng.uniform(0.05, 1)
            t = lambda n, a=a, b=b: max(a, b * n)
        base = rng.randint(0, 5)
        dts, dfs = rng.choice([0.0, 0.05]), rng.choice([0.0, 0.3])
        w = [rng.uniform(0.5, 2) for _ in range(B)] if rng.random() < 0.3 else None
        got = choose_spec_lengths(rates, caps, t, base, dts, dfs, w)
        assert all(0 <= g <= c for g, c in zip(got, caps))
        best = max(goodput(list(ks), rates, t, base, dts, dfs, w)
                   for ks in itertools.product(*[range(c + 1) for c in caps]))
        assert goodput(got, rates, t, base, dts, dfs, w) == pytest.approx(best, rel=1e-9), trial


def test_compute_bound_batches_do_not_speculate():
    t = LinearStepTime(0.0, 1e-3)  # no fixed cost: every token costs the same
    assert choose_spec_lengths([[0.95] * 4] * 8, [4] * 8, t) == [0] * 8
    assert choose_spec_lengths([[1.0] * 4] * 8, [4] * 8, t) == [0] * 8  # a tie: less speculation


def test_speculation_falls_with_load_and_rises_with_acceptance():
    t = LinearStepTime(20e-3, 0.2e-3)  # 20 ms to read the weights, 0.2 ms per token
    per_request = []
    for B in (1, 4, 16, 64, 256, 1024):
        ks = choose_spec_lengths([[0.7] * 5] * B, [5] * B, t)
        per_request.append(sum(ks) / B)
    assert per_request == sorted(per_request, reverse=True)
    assert per_request[0] == 5 and per_request[-1] == 0
    # Beside a long prefill chunk the step is slow anyway and drafts cost little of it: the
    # decoders speculate (the objective counts their tokens; the chunk pays 0.5% more time).
    assert choose_spec_lengths([[0.7] * 5] * 4, [5] * 4, t, base_tokens=4000) == [5] * 4
    by_rate = [choose_spec_lengths([[a] * 8], [8], LinearStepTime(1.0, 0.1))[0] for a in (0.2, 0.5, 0.8, 0.95)]
    assert by_rate == sorted(by_rate) and by_rate[0] < by_rate[-1]


def test_better_requests_get_the_drafts_and_weights_count():
    t = LinearStepTime(1.0, 0.3)
    ks = choose_spec_lengths([[0.9] * 4, [0.3] * 4], [4, 4], t)
    assert ks[0] > ks[1]
    ks_w = choose_spec_lengths([[0.9] * 4, [0.3] * 4], [4, 4], t, weights=[1.0, 5.0])
    assert ks_w[1] > ks[1]


def test_draft_cost_reduces_speculation():
    t = LinearStepTime(1.0, 0.01)
    free = choose_spec_lengths([[0.6] * 6], [6], t)
    costly = choose_spec_lengths([[0.6] * 6], [6], t, draft_token_s=0.2)
    assert free[0] > costly[0]


def test_validation():
    with pytest.raises(ValueError):
        choose_spec_lengths([[0.5]], [2], LinearStepTime(1, 1))
    with pytest.raises(ValueError):
        choose_spec_lengths([[0.5]], [1, 1], LinearStepTime(1, 1))
    with pytest.raises(ValueError):
        LinearStepTime(0.0, 0.0)
    with pytest.raises(ValueError):
        SpecLengthPolicy(4, step_time=None, adaptive=True)


def test_fit_linear_step_time():
    fit = fit_linear_step_time([(n, 0.02 + 0.001 * n) for n in (1, 8, 32, 64)])
    assert fit.fixed_s == pytest.approx(0.02) and fit.per_token_s == pytest.approx(0.001)
    with pytest.raises(ValueError):
        fit_linear_step_time([(4, 0.1), (4, 0.2)])


def test_interpolated_step_time():
    t = InterpolatedStepTime.from_samples([(1, 0.12), (1, 0.10), (1, 0.11), (2, 0.20), (4, 0.19), (4, 0.25), (4, 0.24)])
    # Medians 0.11, 0.20, 0.24; made non-decreasing; linear between and beyond.
    assert t.points == ((1, 0.11), (2, 0.20), (4, 0.24))
    assert t(0) == 0.11 and t(3) == pytest.approx(0.22) and t(6) == pytest.approx(0.28)
    assert InterpolatedStepTime.from_samples([(1, 0.3), (2, 0.2)]).points == ((1, 0.3), (2, 0.3))
    with pytest.raises(ValueError):
        InterpolatedStepTime(((2, 0.1), (1, 0.2)))
    # A 2-token step costing far more than a 1-token one: speculate only when acceptance is high.
    assert choose_spec_lengths([[0.5] * 4], [4], t) == [0]
    assert choose_spec_lengths([[0.95] * 4], [4], t) == [4]


def test_roofline_step_time_turns_speculation_off_at_high_load():
    from kvserve.bench.roofline import HW_PRESETS, load_model_spec

    t = roofline_step_time(load_model_spec("qwen2.5-0.5b"), HW_PRESETS["h100"], context=512)
    assert t(8) == pytest.approx(t(1), rel=0.1)  # memory-bound: extra tokens nearly free
    assert t(8192) > 4 * t(1)
    assert choose_spec_lengths([[0.7] * 4], [4], t) == [4]
    assert sum(choose_spec_lengths([[0.7] * 4] * 2048, [4] * 2048, t)) == 0


def test_tracker_ema_per_position():
    tr = AcceptanceTracker(max_k=3, ema=0.5, prior=0.5)
    tr.observe("a", 3, 1)  # pos 1 accepted, pos 2 rejected, pos 3 untried
    assert tr.rates("a") == [0.75, 0.25, 0.5]
    assert tr.overall == [0.75, 0.25, 0.5]
    tr.observe("a", 2, 2)
    assert tr.rates("a") == [0.875, 0.625, 0.5]
    assert tr.rates("new") == tr.overall  # new requests start from the overall rates
    tr.observe("b", 1, 0)
    assert tr.rates("b") == [0.875 / 2, 0.625, 0.5]
    tr.remove("a")
    assert len(tr) == 1
    with pytest.raises(ValueError):
        tr.observe("b", 2, 3)


def test_policy_learns_and_turns_off():
    t = LinearStepTime(1.0, 0.2)
    fixed = SpecLengthPolicy(4, adaptive=False)
    assert fixed.choose([("a", 6), ("b", 2), ("c", 0)]) == [4, 2, 0]
    pol = SpecLengthPolicy(4, step_time=t, tracker=AcceptanceTracker(4, ema=0.5, prior=0.5, recovery=0.0))
    start = pol.choose([("a", 4)])[0]
    for _ in range(6):
        pol.observe("a", 4, 4)
    assert pol.choose([("a", 4)])[0] == 4 > start - 1
    for _ in range(8):
        pol.observe("a", 4, 0)
    assert pol.choose([("a", 4)]) == [0]
    pol.remove("a")
    assert len(pol.tracker) == 0


def test_relax_moves_untried_positions_toward_the_prior():
    tr = AcceptanceTracker(max_k=3, ema=1.0, prior=0.8, recovery=0.5)
    tr.observe("a", 3, 0)  # position 1 rejected: [0, 0.8, 0.8]
    tr.relax("a", from_position=0)
    assert tr.rates("a") == pytest.approx([0.4, 0.8, 0.8])
    tr.observe("a", 3, 1)  # [1, 0, 0.8]
    tr.relax("a", from_position=1)
    assert tr.rates("a") == pytest.approx([1.0, 0.4, 0.8])


def test_a_request_turned_off_is_retried_at_low_load_only():
    def turned_off(step_time):
        pol = SpecLengthPolicy(4, step_time=step_time, tracker=AcceptanceTracker(4, ema=0.5))
        for _ in range(8):
            pol.observe("a", 4, 0)
        return pol

    # A draft token costs a third of a step: drafting pays once the estimate passes 1/3,
    # which relaxing from ~0 toward 0.8 by 2% a step reaches at step 27.
    low = turned_off(LinearStepTime(1.0, 0.5))
    ks = [low.choose([("a", 4)])[0] for _ in range(200)]
    first = next(i for i, k in enumerate(ks) if k > 0)
    assert first == 27 and ks[first] == 1  # off for a while, then a one-token probe
    low.observe("a", 1, 0)  # the probe fails: off again
    assert low.choose([("a", 4)]) == [0]
    busy = turned_off(LinearStepTime(0.0, 1e-3))  # compute-bound: drafting never pays
    assert [busy.choose([("a", 4)] * 1)[0] for _ in range(500)] == [0] * 500


# ------------------------------------------------------------------ closed batch: one k for the critical set
def joint_advance_rate(k, rates, t, base=0, draft_token_s=0.0, draft_fixed_s=0.0):
    """(1 + E[min_i accepted_i]) / step time, by enumerating every outcome of every request."""
    n = len(rates)
    outcomes = []  # per request: P(accepted == a) for a = 0..k
    for r in rates:
        probs, alive = [], 1.0
        for a in range(k + 1):
            nxt = alive * r[a] if a < k else 0.0
            probs.append(alive - nxt)
            alive = nxt
        outcomes.append(probs)
    e_min = sum(math.prod(p[a] for p, a in zip(outcomes, combo)) * min(combo)
                for combo in itertools.product(range(k + 1), repeat=n))
    time = t(base + n * (k + 1)) + ((draft_fixed_s + draft_token_s * n * k) if k else 0.0)
    return (1 + e_min) / time


def test_joint_length_matches_enumeration_and_is_the_single_request_choice_for_one():
    rng = random.Random(1)
    for trial in range(200):
        n = rng.randint(1, 3)
        caps = [rng.randint(0, 3) for _ in range(n)]
        rates = [[rng.uniform(0.3, 1.0) for _ in range(3)] for _ in range(n)]
        a, b = rng.uniform(0.5, 2), rng.uniform(0.02, 0.5)
        t = (lambda m, a=a, b=b: max(a, b * m)) if rng.random() < 0.5 else LinearStepTime(a, b)
        base = rng.randint(0, 6)
        dts = rng.choice([0.0, 0.05])
        got = choose_joint_length(rates, caps, t, base, dts)
        assert 0 <= got <= min(caps)
        best = max(joint_advance_rate(k, rates, t, base, dts) for k in range(min(caps) + 1))
        assert joint_advance_rate(got, rates, t, base, dts) == pytest.approx(best, rel=1e-9), trial
        if n == 1:
            assert [got] == choose_spec_lengths(rates, caps, t, base, dts)


def test_a_large_critical_set_does_not_draft_where_each_request_alone_would():
    t = lambda m: max(0.030, 0.003 * m)  # weight-bound up to 10 tokens
    rates = [[0.7] * 4] * 8
    assert sum(choose_spec_lengths(rates, [4] * 8, t)) >= 2  # each request's tokens counted
    assert choose_joint_length(rates, [4] * 8, t) == 0  # 0.7 ** 8: a saved step is unlikely
    assert choose_joint_length([[0.95] * 4] * 2, [4, 4], t) > 0  # two likely requests: worth it
    assert choose_joint_length([[0.95] * 4, [0.95] * 4], [4, 0], t) == 0  # one cannot draft
    with pytest.raises(ValueError):
        choose_joint_length([[0.5]], [2], t)


def test_policy_chooses_jointly_when_asked():
    pol = SpecLengthPolicy(4, step_time=LinearStepTime(0.030, 0.004))
    ka, kb = pol.choose([("a", 4), ("b", 4)], jointly=True)
    assert ka == kb > 0  # the prior 0.8 for both: one k
    for _ in range(10):
        pol.observe("b", 1, 0)  # b's drafts are rejected
    assert pol.choose([("a", 4), ("b", 4)], jointly=True) == [0, 0]
    assert pol.choose([("a", 4), ("b", 4)])[0] > 0  # on its own, a still drafts
