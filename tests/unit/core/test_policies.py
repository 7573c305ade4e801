"""Policies are objects with state: a per-tenant fair-share policy written against the
interface orders admission and picks victims from its counters; the clock is injected."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import pytest

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.policies import POLICIES, FCFSPolicy, SchedulingPolicy, make_policy
from kvserve.core.scheduler import Scheduler
from kvserve.protocol import ModelRunnerOutput, SampledToken
from kvserve.request import SLO, Request
from kvserve.sampling_params import SamplingParams

BS = 4


class TenantFairPolicy(SchedulingPolicy):
    """Virtual-token-counter fairness (VTC-like): serve the tenant that got the fewest
    tokens so far; preempt from the tenant that got the most."""

    name = "tenant-fair"

    def __init__(self) -> None:
        super().__init__()
        self.served: dict[Optional[str], int] = {}
        self.finished: list[str] = []
        self._waiting: list[Request] = []

    def _key(self, r: Request) -> tuple[int, float]:
        return self.served.get(r.tenant, 0), r.arrival_time

    def add(self, request: Request) -> None:
        self._waiting.append(request)

    add_preempted = add

    def peek(self) -> Optional[Request]:
        return min(self._waiting, key=self._key) if self._waiting else None

    def pop(self) -> Request:
        r = self.peek()
        assert r is not None
        self._waiting.remove(r)
        return r

    def remove(self, request: Request) -> None:
        self._waiting.remove(request)

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[Request]:
        return iter(sorted(self._waiting, key=self._key))

    def victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=lambda r: (self.served.get(r.tenant, 0), r.arrival_time))

    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        self.served[request.tenant] = self.served.get(request.tenant, 0) + num_tokens

    def on_finished(self, request: Request) -> None:
        self.finished.append(request.request_id)


def req(rid: str, n: int, tenant: str, arrival: float, max_tokens: int = 2, start: int = 0) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens), arrival_time=arrival,
                   block_size=BS, tenant=tenant)


def run(s: Scheduler) -> list[str]:
    """Step until idle; return request ids in order of first admission."""
    admitted: list[str] = []
    while s.has_unfinished():
        out = s.schedule()
        s.kv.check_integrity()
        admitted += [r.request_id for r in out.requests if r.request_id not in admitted]
        s.update_from_output(out, ModelRunnerOutput(
            sampled={r.request_id: [SampledToken(7)] for r in out.requests if r.sample}))
        s.kv.check_integrity()
    return admitted


def workload() -> list[Request]:
    a = [req(f"a{i}", 4, "a", float(i), start=10 * i) for i in range(4)]
    b = [req(f"b{i}", 4, "b", 4.0 + i, start=100 + 10 * i) for i in range(2)]
    return a + b


def test_fair_policy_interleaves_tenants_where_fcfs_serves_in_arrival_order():
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=64)
    fcfs = Scheduler(config, KVCacheManager(16, BS))
    for r in workload():
        fcfs.add_request(r)
    assert run(fcfs) == ["a0", "a1", "a2", "a3", "b0", "b1"]

    policy = TenantFairPolicy()
    fair = Scheduler(config, KVCacheManager(16, BS), policy=policy)
    for r in workload():
        fair.add_request(r)
    # a0 runs first (nobody served yet, earliest); then b0 (b has 0 tokens); then the tie
    # (5 tokens each: 4 prompt + 1 decode) goes to the earlier arrival, and so on.
    assert run(fair) == ["a0", "b0", "a1", "b1", "a2", "a3"]
    assert policy.served == {"a": 20, "b": 10}  # every scheduled token was accounted
    assert sorted(policy.finished) == ["a0", "a1", "a2", "a3", "b0", "b1"]


@pytest.mark.parametrize("policy, victim", [(None, "b"), (TenantFairPolicy, "a")])
def test_victim_comes_from_the_policys_state(policy, victim):
    # 4 blocks of 4: "a" (8 tokens, 2 blocks) and "b" (7 tokens, 2 blocks) fill the pool;
    # a's first decode needs a third block.  FCFS preempts the latest arrival (b); the
    # fair policy preempts the tenant that was served more (a: 8 tokens against 7).
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                  KVCacheManager(4, BS), policy=policy() if policy else None)
    s.add_request(req("a", 8, "a", 0.0, max_tokens=4))
    s.add_request(req("b", 7, "b", 1.0, max_tokens=4, start=100))
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput(sampled={r.request_id: [SampledToken(7)] for r in out.requests}))
    out = s.schedule()
    assert out.preempted_ids == [victim]
    s.kv.check_integrity()


def test_injected_clock_stamps_first_token_and_finish():
    now = [100.0]
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                  KVCacheManager(8, BS), clock=lambda: now[0])
    s.add_request(req("r", 5, "t", arrival=99.0, max_tokens=2))
    r = s.requests["r"]
    out = s.schedule()
    now[0] = 101.5
    s.update_from_output(out, ModelRunnerOutput(sampled={"r": [SampledToken(7)]}))
    assert r.first_token_time == 101.5
    out = s.schedule()
    now[0] = 103.0
    s.update_from_output(out, ModelRunnerOutput(sampled={"r": [SampledToken(7)]}))
    assert r.is_finished and r.finish_time == 103.0
    assert s.policy.clock() == 103.0  # the default policy got the same clock


def test_requests_carry_tenant_and_slo_as_plain_data_into_forks():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), KVCacheManager(16, BS))
    r = Request("g#0", list(range(9)), SamplingParams(n=2, max_tokens=2), block_size=BS, parent_id="g",
                num_samples_to_fork=2, tenant="acme", slo=SLO(ttft_s=0.5, tpot_s=0.05), priority=3)
    s.add_request(r)
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput(sampled={"g#0": [SampledToken(7)]}))
    (child,) = s.new_forks
    assert (child.tenant, child.slo, child.priority) == ("acme", SLO(0.5, 0.05), 3)
    with pytest.raises(ValueError, match="ttft_s"):
        SLO(ttft_s=0)


def test_registry_builds_policies_with_the_clock():
    clock = lambda: 7.0  # noqa: E731
    for name in POLICIES:
        p = make_policy(name, clock)
        assert p.name == name and p.clock() == 7.0
    assert isinstance(make_policy("fcfs"), FCFSPolicy)
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        make_policy("lottery")
