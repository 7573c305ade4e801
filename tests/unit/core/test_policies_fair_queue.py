"""The `fair` policy as the scheduler's waiting queue: what the scheduler peeks is what it pops
(also across a displacement), so every waiting or preempted request is queued exactly once,
and aborting a waiting, a preempted or a running request works."""
from __future__ import annotations

import random

import pytest

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.policies_fair import VTCPolicy
from kvserve.core.scheduler import Scheduler
from kvserve.core.swap import SwapManager
from kvserve.protocol import ModelRunnerOutput, SampledToken
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams

BS = 4


def req(rid: str, n: int, tenant: str, arrival: float, start: int, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens), arrival_time=arrival,
                   block_size=BS, tenant=tenant)


def step(s: Scheduler) -> list[str]:
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput(
        sampled={r.request_id: [SampledToken(7)] for r in out.requests if r.sample}))
    s.kv.check_integrity()
    return [r.request_id for r in out.requests]


def check_queue(s: Scheduler) -> None:
    """Waiting and preempted requests are queued once each; nothing else is."""
    queued = [r.request_id for r in s.waiting]
    assert len(queued) == len(set(queued)) == len(s.waiting)
    expect = sorted(rid for rid, r in s.requests.items()
                    if r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED))
    assert sorted(queued) == expect


def _displacement_state() -> tuple[Scheduler, VTCPolicy, list[Request], Request]:
    """b holds every seat (decoding); a, whose counter is ahead of b's, waits.  With every
    seat taken a (a whole seat below its share) displaces b's latest request, which goes back
    to b's queue; b's counter is the smaller, so b is now the head tenant."""
    p = VTCPolicy(protect_prefill=False)
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64),
                  KVCacheManager(64, BS), policy=p)
    b = [req(f"b{i}", 4, "b", float(i), 100 * i, max_tokens=20) for i in range(2)]
    for r in b:
        s.add_request(r)
    step(s)
    step(s)  # both decoding
    a0 = req("a0", 4, "a", 5.0, 900)
    s.add_request(a0)
    p.counters["a"] = p.service["a"] = p.counters["b"] + 50.0  # a ahead (not by the threshold)
    return s, p, b, a0


def test_the_request_peeked_is_the_one_admitted_across_a_displacement():
    s, p, b, a0 = _displacement_state()
    out = s.schedule()
    assert out.preempted_ids == ["b1"] and s.preemptions_by == {("policy", "recompute"): 1}
    assert {r.request_id for r in out.requests} == {"b0", "a0"}
    assert a0.status == RequestStatus.RUNNING and a0 in s.running
    # The victim is queued (at the front of b's queue), the admitted request is not.
    assert [r.request_id for r in p] == ["b1"] and b[1].status == RequestStatus.PREEMPTED
    check_queue(s)


@pytest.mark.parametrize("target", ["b1", "a0", "b0"])
def test_abort_after_a_displacement(target):
    """Abort the preempted victim (b1), the displacing request now running (a0), or a request
    that ran all along (b0); the others finish and every block comes back."""
    s, p, _, _ = _displacement_state()
    s.schedule()  # the displacement (no output: the step is dropped)
    assert s.abort(target) is not None
    check_queue(s)
    while s.has_unfinished():
        step(s)
        check_queue(s)
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_abort_a_waiting_request_of_a_tenant_with_others_waiting():
    p = VTCPolicy()
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=64),
                  KVCacheManager(64, BS), policy=p)
    reqs = [req(f"{t}{i}", 4, t, float(i), 100 * i + (50 if t == "b" else 0)) for i in range(3) for t in "ab"]
    for r in reqs:
        s.add_request(r)
    step(s)
    assert s.abort("a1") is not None and s.abort("b2") is not None
    check_queue(s)
    assert "a1" not in [r.request_id for r in p] and len(p) == 3
    while s.has_unfinished():
        step(s)
    assert s.kv.num_free_blocks == s.kv.num_blocks


@pytest.mark.parametrize("swap", [False, True])
def test_random_aborts_keep_the_queue_exact(swap):
    """Three tenants, a small pool (preemption by blocks), two seats (displacements), random
    aborts of waiting, preempted and running requests: after every step each waiting or
    preempted request is queued exactly once (before the fix a displacement's victim could
    drop out of the queue and its abort raised ValueError)."""
    for seed in range(25):
        rng = random.Random(seed)
        p = VTCPolicy(protect_prefill=rng.random() < 0.5)
        s = Scheduler(SchedulerConfig(max_num_seqs=rng.choice([2, 4]), max_num_batched_tokens=rng.choice([8, 16, 64]),
                                      max_model_len=160),
                      KVCacheManager(rng.choice([12, 24, 48]), BS), policy=p,
                      swap=SwapManager(64, mode="swap") if swap else None)
        pending = [req(f"r{i}", rng.randrange(1, 40), rng.choice("abc"), float(i), 1000 * i,
                       max_tokens=rng.randrange(1, 12)) for i in range(30)]
        for _ in range(400):
            while pending and rng.random() < 0.4:
                s.add_request(pending.pop(0))
            if s.requests and rng.random() < 0.1:
                assert s.abort(rng.choice(sorted(s.requests))) is not None
            check_queue(s)
            step(s)
            if not pending and not s.has_unfinished():
                break
        assert not s.has_unfinished(), f"seed {seed}: requests left"
        assert s.kv.num_free_blocks == s.kv.num_blocks


@pytest.mark.parametrize("module", ["kvserve.core.policies_fair", "kvserve.core.policies_slo"])
def test_a_policy_module_imports_on_its_own(module):
    """Imported first (before kvserve.core.policies) it was a circular ImportError."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
