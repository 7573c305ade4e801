"""Redis tier against a real redis-server: round trips, pipelined batches,
corrupt values, namespaces, and behaviour while Redis is down and after it returns."""
from __future__ import annotations

import time
from typing import Callable, Iterator

import pytest
import redis
import torch

from kvserve.kv_store import KVNamespace, get_codec
from kvserve.kv_store.redis_tier import RedisTier
from tests.unit.kv_store.kvstore_helpers import RedisProcess, free_port, key, make_block, make_ns


@pytest.fixture
def tier(redis_url: str) -> Iterator[RedisTier]:
    t = RedisTier(make_ns(), get_codec("raw"), redis_url)
    yield t
    t.clear()
    t.close()


def test_roundtrip_contains_and_stats(tier: RedisTier) -> None:
    ns = tier.namespace
    b = make_block(ns, 1)
    assert tier.get(key(1)) is None and not tier.contains(key(1))
    tier.put(key(1), b)
    assert tier.contains(key(1))
    got = tier.get(key(1))
    assert got is not None and torch.equal(got, b)
    s = tier.stats
    assert (s.hits, s.misses, s.puts, s.errors) == (1, 1, 1, 0)
    assert s.bytes_written == s.bytes_read > ns.block_nbytes   # header + payload


def test_keys_carry_the_namespace_prefix(tier: RedisTier, redis_url: str) -> None:
    tier.put(key(1), make_block(tier.namespace))
    client = redis.Redis.from_url(redis_url)
    rk = tier.redis_key(key(1))
    assert rk.startswith(b"kvserve:" + tier.namespace.digest()[:8].hex().encode() + b":")
    assert client.exists(rk) == 1
    client.close()


def test_batches_are_pipelined_and_per_key(tier: RedisTier) -> None:
    ns = tier.namespace
    n = 150   # more than one internal batch of 64
    tier.put_many([(key(i), make_block(ns, i)) for i in range(0, n, 2)])
    keys = [key(i) for i in range(n)]
    assert tier.contains_many(keys) == [i % 2 == 0 for i in range(n)]
    got = tier.get_many(keys)
    for i, g in enumerate(got):
        if i % 2:
            assert g is None
        else:
            assert g is not None and torch.equal(g, make_block(ns, i))
    assert tier.stats.hits == n // 2 and tier.stats.misses == n // 2


def test_corrupt_value_is_dropped(tier: RedisTier, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    tier.put(key(1), make_block(tier.namespace, 1))
    client = redis.Redis.from_url(redis_url)
    rk = tier.redis_key(key(1))
    value = bytearray(client.get(rk))
    value[-1] ^= 0xFF
    client.set(rk, bytes(value))
    with caplog.at_level("WARNING"):
        assert tier.get(key(1)) is None
    assert "checksum mismatch" in caplog.text and tier.stats.corrupt == 1
    assert client.exists(rk) == 0
    client.set(rk, b"garbage")
    assert tier.get(key(1)) is None and tier.stats.corrupt == 2
    client.close()


def test_other_model_and_other_codec_miss(redis_url: str) -> None:
    ns_a, ns_b = make_ns(model_id="redis-a"), make_ns(model_id="redis-b")
    a = RedisTier(ns_a, get_codec("raw"), redis_url)
    b = RedisTier(ns_b, get_codec("raw"), redis_url)
    a_int8 = RedisTier(ns_a, get_codec("int8"), redis_url)
    try:
        a.clear()
        a.put(key(1), make_block(ns_a, 1))
        assert b.get(key(1)) is None and a_int8.get(key(1)) is None
        assert a.get(key(1)) is not None
        # A value of model A copied under model B's key is caught by the header check.
        client = redis.Redis.from_url(redis_url)
        client.set(b.redis_key(key(1)), client.get(a.redis_key(key(1))))
        assert b.get(key(1)) is None and b.stats.corrupt == 1
        client.close()
    finally:
        for t in (a, b, a_int8):
            t.clear()
            t.close()


def test_ttl_and_clear_scope(redis_url: str) -> None:
    ns = make_ns()
    t = RedisTier(ns, get_codec("raw"), redis_url, ttl_s=60)
    other = RedisTier(make_ns(), get_codec("raw"), redis_url)
    try:
        t.put(key(1), make_block(ns))
        other.put(key(1), make_block(other.namespace))
        client = redis.Redis.from_url(redis_url)
        assert 0 < client.pttl(t.redis_key(key(1))) <= 60_000
        assert client.pttl(other.redis_key(key(1))) == -1      # no TTL unless asked
        t.clear()
        assert not t.contains(key(1)) and other.contains(key(1))   # clear is per namespace
        client.close()
    finally:
        other.clear()
        t.close()
        other.close()


# ---------------------------------------------------------------- Redis down


def test_unreachable_redis_is_a_miss_and_puts_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    ns = make_ns()
    url = f"redis://127.0.0.1:{free_port()}/0"   # nothing listens there
    t = RedisTier(ns, get_codec("raw"), url, backoff_initial_s=60)
    with caplog.at_level("WARNING"):
        t0 = time.monotonic()
        t.put(key(1), make_block(ns))             # no exception
        assert t.get(key(1)) is None
        assert t.contains_many([key(1), key(2)]) == [False, False]
        t.put_many([(key(2), make_block(ns))])
        t.remove(key(1))
        t.clear()
        assert time.monotonic() - t0 < 2.0
    s = t.stats
    assert s.errors == 1                 # first failure, then backing off without network calls
    assert s.dropped_puts == 2 and s.misses == 1
    assert not t.available
    assert caplog.text.count("unreachable") == 1
    t.close()


def test_reconnects_after_redis_comes_back(redis_process: Callable[[], RedisProcess]) -> None:
    server = redis_process()
    server.start()
    ns = make_ns()
    t = RedisTier(ns, get_codec("raw"), server.url, backoff_initial_s=0.05, backoff_max_s=0.2)
    t.put(key(1), make_block(ns, 1))
    assert t.get(key(1)) is not None

    server.stop()
    assert t.get(key(1)) is None          # pooled connection is dead: a miss, no exception
    t.put(key(2), make_block(ns, 2))       # dropped
    assert t.stats.errors >= 1 and not t.contains(key(2))

    server.start()                         # same port, empty (no persistence)
    deadline = time.monotonic() + 5
    while not t.available and time.monotonic() < deadline:
        time.sleep(0.02)
    t.put(key(3), make_block(ns, 3))
    got = t.get(key(3))
    assert got is not None and torch.equal(got, make_block(ns, 3))
    assert t.available
    t.close()


def test_redis_without_server_in_tier_spec_does_not_raise(ns: KVNamespace) -> None:
    from kvserve.kv_store import build_kv_store

    store = build_kv_store(f"cpu:1MiB,redis://127.0.0.1:{free_port()}/0", ns)
    store.put(key(1), make_block(ns))
    assert store.get(key(1)) is not None       # served from the cpu tier
    assert store.get(key(2)) is None
    store.close()
