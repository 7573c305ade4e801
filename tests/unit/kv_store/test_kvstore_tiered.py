"""TieredKVStore (promotion, write policies, demotion) and the spec registry."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvserve.kv_store import (
    CpuTier,
    DiskTier,
    KVNamespace,
    KVStore,
    TieredKVStore,
    build_kv_store,
    get_codec,
    parse_size,
    parse_tier_spec,
)
from kvserve.kv_store.redis_tier import RedisTier
from tests.unit.kv_store.kvstore_helpers import key, make_block, make_ns, redis_url_or_skip


def two_tiers(ns: KVNamespace, tmp_path: Path, cpu_blocks: int = 8, **kw: object) -> TieredKVStore:
    cpu = CpuTier(ns, get_codec("raw"), cpu_blocks * ns.block_nbytes)
    disk = DiskTier(ns, get_codec("raw"), tmp_path / "disk", 1 << 20)
    return TieredKVStore([cpu, disk], **kw)  # type: ignore[arg-type]


def test_store_satisfies_the_engine_protocol(ns: KVNamespace, tmp_path: Path) -> None:
    store = two_tiers(ns, tmp_path)
    assert isinstance(store, KVStore) and isinstance(store.tiers[0], KVStore)


def test_write_through_writes_every_tier(ns: KVNamespace, tmp_path: Path) -> None:
    store = two_tiers(ns, tmp_path)
    store.put(key(1), make_block(ns, 1))
    assert all(t.contains(key(1)) for t in store.tiers)
    got = store.get(key(1))
    assert got is not None and torch.equal(got, make_block(ns, 1))
    assert store.hits_by_tier == [1, 0]


def test_hit_in_lower_tier_is_promoted(ns: KVNamespace, tmp_path: Path) -> None:
    store = two_tiers(ns, tmp_path)
    cpu, disk = store.tiers
    disk.put(key(1), make_block(ns, 1))           # only on disk
    assert not cpu.contains(key(1))
    got = store.get(key(1))
    assert got is not None and torch.equal(got, make_block(ns, 1))
    assert cpu.contains(key(1)) and store.promotions == 1
    assert store.get(key(1)) is not None
    assert store.hits_by_tier == [1, 1] and disk.stats.hits == 1   # second hit served by cpu
    assert store.get(key(2)) is None and store.stats.misses == 1


def test_promotion_into_every_upper_tier(tmp_path: Path) -> None:
    ns = make_ns()
    tiers = [CpuTier(ns, get_codec("raw"), 1 << 20), CpuTier(ns, get_codec("int8"), 1 << 20),
             DiskTier(ns, get_codec("raw"), tmp_path, 1 << 20)]
    store = TieredKVStore(tiers)
    tiers[2].put(key(1), make_block(ns, 1))
    assert store.get(key(1)) is not None
    assert tiers[0].contains(key(1)) and tiers[1].contains(key(1))


def test_get_many_mixes_tiers_and_misses(ns: KVNamespace, tmp_path: Path) -> None:
    store = two_tiers(ns, tmp_path)
    cpu, disk = store.tiers
    cpu.put(key(0), make_block(ns, 0))
    disk.put(key(2), make_block(ns, 2))
    got = store.get_many([key(0), key(1), key(2)])
    assert got[1] is None
    assert got[0] is not None and torch.equal(got[0], make_block(ns, 0))
    assert got[2] is not None and torch.equal(got[2], make_block(ns, 2))
    assert store.hits_by_tier == [1, 1] and store.stats.hits == 2 and store.stats.misses == 1
    assert store.contains_many([key(0), key(1), key(2)]) == [True, False, True]


def test_longest_prefix(ns: KVNamespace, tmp_path: Path) -> None:
    store = two_tiers(ns, tmp_path)
    store.tiers[0].put(key(0), make_block(ns))
    store.tiers[1].put(key(1), make_block(ns))
    store.tiers[1].put(key(3), make_block(ns))
    assert store.longest_prefix([key(0), key(1), key(2), key(3)]) == 2
    assert store.longest_prefix([key(5), key(0)]) == 0
    assert store.longest_prefix([]) == 0


def test_demote_policy_moves_evicted_blocks_down(ns: KVNamespace, tmp_path: Path) -> None:
    store = two_tiers(ns, tmp_path, cpu_blocks=2, write_policy="demote")
    cpu, disk = store.tiers
    for i in range(5):
        store.put(key(i), make_block(ns, i))
    # Only overflow reached the disk: 0, 1, 2 were evicted from cpu and demoted.
    assert [cpu.contains(key(i)) for i in range(5)] == [False, False, False, True, True]
    assert [disk.contains(key(i)) for i in range(5)] == [True, True, True, False, False]
    assert store.demotions == 3
    got = store.get(key(0))                       # served by disk, promoted to cpu ...
    assert got is not None and torch.equal(got, make_block(ns, 0))
    assert cpu.contains(key(0)) and disk.contains(key(3))   # ... which demoted 3
    assert all(store.contains(key(i)) for i in range(5))


def test_corrupt_entry_in_one_tier_falls_through_to_the_next(tmp_path: Path) -> None:
    ns = make_ns()
    d1 = DiskTier(ns, get_codec("raw"), tmp_path / "a", 1 << 20)
    d2 = DiskTier(ns, get_codec("raw"), tmp_path / "b", 1 << 20)
    store = TieredKVStore([d1, d2])
    store.put(key(1), make_block(ns, 1))
    p = d1.path_for(key(1))
    p.write_bytes(p.read_bytes()[:-1])
    got = store.get(key(1))
    assert got is not None and torch.equal(got, make_block(ns, 1))
    assert d1.stats.corrupt == 1 and d1.contains(key(1))   # re-promoted, now intact
    assert torch.equal(d1.get(key(1)), make_block(ns, 1))   # type: ignore[arg-type]


def test_remove_and_stats_by_tier(ns: KVNamespace, tmp_path: Path) -> None:
    store = two_tiers(ns, tmp_path)
    store.put(key(1), make_block(ns))
    store.remove(key(1))
    assert not store.contains(key(1))
    assert set(store.tier_stats()) == {"0:cpu", "1:disk"}
    assert store.tier_stats()["1:disk"].puts == 1


# ---------------------------------------------------------------- registry


def test_parse_size() -> None:
    assert parse_size("1000000") == 1_000_000
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("20GB") == 20 * 10**9
    assert parse_size("1.5K") == 1536
    assert parse_size("2g") == 2 << 30
    for bad in ["", "abc", "4 XB", "-1", "0"]:
        with pytest.raises(ValueError):
            parse_size(bad)


def test_parse_tier_spec() -> None:
    s = parse_tier_spec("cpu:4GiB")
    assert (s.scheme, s.size, s.options) == ("cpu", 4 << 30, {})
    s = parse_tier_spec("disk:/var/cache/kvserve:20GiB:codec=cachegen")
    assert (s.scheme, s.location, s.size, s.options) == ("disk", "/var/cache/kvserve", 20 << 30,
                                                         {"codec": "cachegen"})
    s = parse_tier_spec("redis://127.0.0.1:6379/2?codec=int8&ttl=30")
    assert (s.scheme, s.location, s.options) == ("redis", "redis://127.0.0.1:6379/2", {"codec": "int8", "ttl": "30"})
    s = parse_tier_spec("redis://:pw@host:6380/0:codec=fp8")
    assert (s.location, s.options) == ("redis://:pw@host:6380/0", {"codec": "fp8"})
    for bad in ["", "cpu", "cpu:", "disk:/x", "disk:20GiB"]:
        with pytest.raises(ValueError):
            parse_tier_spec(bad)


def test_build_kv_store_from_spec(ns: KVNamespace, tmp_path: Path) -> None:
    store = build_kv_store(f"cpu:1MiB, disk:{tmp_path}/d:2MiB:codec=int8", ns, codec="raw",
                           write_policy="demote")
    cpu, disk = store.tiers
    assert isinstance(cpu, CpuTier) and isinstance(disk, DiskTier)
    assert cpu.capacity_bytes == 1 << 20 and disk.capacity_bytes == 2 << 20
    assert cpu.codec.name == "raw" and disk.codec.name == "int8"
    assert store.write_policy.value == "demote"
    store.put(key(1), make_block(ns))
    assert store.get(key(1)) is not None
    assert "disk(" in store.describe()
    store.close()


def test_build_kv_store_rejects_bad_specs_before_building(ns: KVNamespace, tmp_path: Path) -> None:
    for bad in ["", "tape:1GiB", f"disk:{tmp_path}/x:1GiB:codec=zip", "cpu:1GiB:colour=red",
                "cpu:1GiB:ttl=3"]:
        with pytest.raises(ValueError):
            build_kv_store(bad, ns)
    assert not (tmp_path / "x").exists()   # validated before any tier was created


def test_three_tier_chain_with_redis(tmp_path: Path) -> None:
    url = redis_url_or_skip()
    ns = make_ns()
    store = build_kv_store(f"cpu:1MiB,disk:{tmp_path}:1MiB,{url}:codec=cachegen", ns)
    try:
        redis_tier = store.tiers[2]
        assert isinstance(redis_tier, RedisTier) and redis_tier.codec.name == "cachegen"
        redis_tier.put(key(1), make_block(ns, 1))
        got = store.get(key(1))
        assert got is not None and store.hits_by_tier == [0, 0, 1]
        assert store.tiers[0].contains(key(1)) and store.tiers[1].contains(key(1))
        assert float((got - make_block(ns, 1)).abs().max()) < 0.1
    finally:
        store.clear()
        store.close()


def test_concurrent_use_keeps_bounds_and_data_intact(tmp_path: Path) -> None:
    import threading

    ns = make_ns()
    store = two_tiers(ns, tmp_path, cpu_blocks=4, write_policy="demote")
    disk = store.tiers[1]
    assert isinstance(disk, DiskTier)
    blocks = {i: make_block(ns, i) for i in range(24)}
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for r in range(3):
                for i in range(offset, 24, 3):
                    store.put(key(i), blocks[i])
                    got = store.get(key((i + r) % 24))
                    if got is not None:
                        assert torch.equal(got, blocks[(i + r) % 24])
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and not any(t.is_alive() for t in threads)
    cpu = store.tiers[0]
    assert cpu.used_bytes is not None and cpu.used_bytes <= 4 * ns.block_nbytes
    assert disk.used_bytes == sum(p.stat().st_size for p in (tmp_path / "disk").rglob("*.kvb"))
    for i in range(24):   # every block is somewhere (disk is large enough for all)
        got = store.get(key(i))
        assert got is not None and torch.equal(got, blocks[i])


@pytest.mark.parametrize("write_policy", ["write_through", "demote"])
def test_persist_many_writes_only_the_persistent_tiers(ns: KVNamespace, tmp_path: Path, write_policy: str) -> None:
    store = two_tiers(ns, tmp_path, write_policy=write_policy)
    cpu, disk = store.tiers
    assert [t.persistent for t in store.tiers] == [False, True] and store.persistent_tiers == [disk]
    store.persist_many([(key(1), make_block(ns, 1))])   # under demote a put would stop at cpu
    assert disk.contains(key(1)) and not cpu.contains(key(1)) and store.stats.puts == 1
