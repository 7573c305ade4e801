"""Routing policies on exact instance state; the registry."""
from __future__ import annotations

import pytest

from kvserve.hashing import hash_block_tokens
from kvserve.router.instances import Instance
from kvserve.router.kv_index import KVIndex
from kvserve.router.policies import (
    KVAwarePolicy, LeastLoadPolicy, PolicyContext, RoundRobinPolicy, create_policy, policy_names, register_policy,
)
from kvserve.router.prompts import RouteRequest
from kvserve.router.scrape import InstanceStats

BS = 16


def insts(n: int) -> list[Instance]:
    return [Instance(f"http://h:{9000 + i}", healthy=True, checked=True) for i in range(n)]


def req(tokens: list[int]) -> RouteRequest:
    return RouteRequest("/v1/completions", len(tokens), hash_block_tokens(tokens, BS))


def test_registry() -> None:
    assert policy_names()[:3] == ["round-robin", "least-load", "kv-aware"]
    assert isinstance(create_policy("least-load", PolicyContext()), LeastLoadPolicy)
    with pytest.raises(ValueError, match="unknown routing policy 'nope'"):
        create_policy("nope", PolicyContext())
    with pytest.raises(ValueError, match="registered twice"):
        register_policy("round-robin")(RoundRobinPolicy)
    with pytest.raises(ValueError, match="KV index"):
        KVAwarePolicy(PolicyContext(kv_index=None))


def test_round_robin_cycles_over_the_candidates() -> None:
    a, b, c = insts(3)
    p = RoundRobinPolicy(PolicyContext())
    assert [p.choose([a, b, c], RouteRequest()).instance for _ in range(4)] == [a, b, c, a]
    assert [p.choose([a, c], RouteRequest()).instance for _ in range(2)] == [a, c]  # turns 4, 5 of 2 candidates


def test_least_load_uses_inflight_plus_other_clients_seen_in_the_scrape() -> None:
    a, b = insts(2)
    p = LeastLoadPolicy(PolicyContext())
    # a: scraped 5 queued when this router had 1 there -> 4 from other clients, plus 1 in flight now.
    a.stats, a.inflight_at_scrape, a.inflight = InstanceStats(running=3, waiting=2), 1, 1
    b.stats, b.inflight = InstanceStats(running=1), 3  # scraped before the router sent 3 more
    assert a.load() == 5 and b.load() == 4
    assert p.choose([a, b], RouteRequest()).instance is b
    b.inflight = 4
    assert b.load() == 5
    # Equal load: lower KV usage wins.
    a.stats.kv_usage, b.stats.kv_usage = 0.9, 0.2
    assert p.choose([a, b], RouteRequest()).instance is b
    # Equal load and usage: in turn.
    a.stats.kv_usage = 0.2
    assert {p.choose([a, b], RouteRequest()).instance.url for _ in range(2)} == {a.url, b.url}


def test_least_load_without_metrics_counts_inflight_only() -> None:
    a, b = insts(2)
    a.inflight = 2
    assert LeastLoadPolicy(PolicyContext()).choose([a, b], RouteRequest()).instance is b


def kv_policy(weight: float = 1.0) -> tuple[KVAwarePolicy, KVIndex]:
    index = KVIndex(capacity_blocks=1000, ttl_s=100)
    return KVAwarePolicy(PolicyContext(block_size=BS, kv_index=index, overlap_weight=weight)), index


def test_kv_aware_sends_a_repeated_prefix_to_the_instance_that_has_it() -> None:
    a, b = insts(2)
    p, index = kv_policy()
    first = req(list(range(100)))  # 6 full blocks + 4 tokens
    d = p.choose([a, b], first)
    assert d.overlap_blocks == 0
    p.on_routed(d, first)
    assert index.num_blocks(d.instance.url) == 6
    again = req(list(range(80)) + [7] * 30)  # shares 5 blocks
    d2 = p.choose([a, b], again)
    assert d2.instance is d.instance and d2.overlap_blocks == 5
    # cost = weight * (7 prompt blocks - 5 cached) + 0 blocks in flight
    assert d2.cost == 2.0


def test_kv_aware_never_counts_the_last_prompt_token_as_cached() -> None:
    a, b = insts(2)
    p, index = kv_policy()
    tokens = list(range(64))  # exactly 4 blocks: the engine matches at most 3 ((64-1)//16)
    index.record_routed(a.url, hash_block_tokens(tokens, BS))
    assert p.choose([a, b], req(tokens)).overlap_blocks == 3


def test_kv_aware_load_outweighs_overlap() -> None:
    a, b = insts(2)
    p, index = kv_policy()
    tokens = list(range(160))  # 10 blocks
    index.record_routed(a.url, hash_block_tokens(tokens, BS))
    a.inflight, a.pending_blocks = 3, 20  # cost a = (10 - 9) + 20 = 21; b = 10 + 0
    d = p.choose([a, b], req(tokens))
    assert d.instance is b and d.cost == 10
    a.pending_blocks = 8  # cost a = 1 + 8 = 9 < 10
    assert p.choose([a, b], req(tokens)).instance is a
    # weight 0: overlap is ignored, the least-loaded (in blocks) wins.
    p0, index0 = kv_policy(weight=0.0)
    index0.record_routed(a.url, hash_block_tokens(tokens, BS))
    assert p0.choose([a, b], req(tokens)).instance is b


def test_kv_aware_ties_go_to_fewer_requests_then_the_emptier_cache_then_in_turn() -> None:
    a, b = insts(2)
    p, index = kv_policy()
    a.inflight = 1  # same cost (no overlap, no blocks in flight), one more request
    assert p.choose([a, b], RouteRequest()).instance is b
    a.inflight = 0
    assert {p.choose([a, b], RouteRequest()).instance.url for _ in range(2)} == {a.url, b.url}
    index.record_routed(b.url, hash_block_tokens(list(range(32)), BS))  # b's cache holds more
    assert [p.choose([a, b], req(list(range(900, 950)))).instance for _ in range(2)] == [a, a]
