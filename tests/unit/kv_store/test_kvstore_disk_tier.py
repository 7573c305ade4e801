"""Disk tier: LRU + strict bound, restart, corruption handling, disk-full handling."""
from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from kvserve.kv_store import DiskTier, KVNamespace, get_codec
from kvserve.kv_store.file_format import MAGIC
from tests.unit.kv_store.kvstore_helpers import key, make_block, make_ns


def entry_size(ns: KVNamespace, tmp_path: Path, codec: str = "raw") -> int:
    """Size of one stored file for this namespace (header + payload)."""
    probe = DiskTier(ns, get_codec(codec), tmp_path / "probe", 1 << 30)
    probe.put(key("probe"), make_block(ns))
    size = probe.path_for(key("probe")).stat().st_size
    probe.clear()
    return size


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.kvb"))


def make_tier(ns: KVNamespace, root: Path, blocks: int, tmp_path: Path, codec: str = "raw") -> DiskTier:
    return DiskTier(ns, get_codec(codec), root, blocks * entry_size(ns, tmp_path, codec))


def test_roundtrip_file_layout_and_stats(ns: KVNamespace, tmp_path: Path) -> None:
    tier = DiskTier(ns, get_codec("raw"), tmp_path / "c", 1 << 20)
    b = make_block(ns, 1)
    assert tier.get(key(1)) is None
    tier.put(key(1), b)
    path = tier.path_for(key(1))
    assert path.exists() and path.read_bytes()[:4] == MAGIC
    assert path.parent.parent == tmp_path / "c"
    got = tier.get(key(1))
    assert got is not None and torch.equal(got, b)
    assert tier.stats.bytes_written == path.stat().st_size == tier.used_bytes
    assert list((tmp_path / "c" / "tmp").iterdir()) == []   # no temp files left behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_raw_is_bit_exact_on_disk(dtype: torch.dtype, tmp_path: Path) -> None:
    ns = make_ns(dtype)
    tier = DiskTier(ns, get_codec("raw"), tmp_path, 1 << 20)
    b = make_block(ns, 5)
    tier.put(key(5), b)
    got = tier.get(key(5))
    assert got is not None and got.dtype == dtype and torch.equal(got, b)


def test_lru_eviction_order_and_strict_bound(ns: KVNamespace, tmp_path: Path) -> None:
    root = tmp_path / "c"
    tier = make_tier(ns, root, 3, tmp_path)
    for i in range(3):
        tier.put(key(i), make_block(ns, i))
    assert tier.get(key(0)) is not None                 # order: 1, 2, 0
    tier.put(key(3), make_block(ns, 3))                 # evicts 1
    tier.put(key(4), make_block(ns, 4))                 # evicts 2
    assert [tier.contains(key(i)) for i in range(5)] == [True, False, False, True, True]
    assert not tier.path_for(key(1)).exists() and not tier.path_for(key(2)).exists()
    assert tier.stats.evictions == 2
    assert dir_bytes(root) == tier.used_bytes <= tier.capacity_bytes
    for i in range(5, 30):
        tier.put(key(i), make_block(ns, i))
        assert dir_bytes(root) == tier.used_bytes <= tier.capacity_bytes
    assert len(tier) == 3


def test_restart_finds_entries_in_lru_order(ns: KVNamespace, tmp_path: Path) -> None:
    root = tmp_path / "c"
    tier = make_tier(ns, root, 4, tmp_path)
    for i in range(4):
        tier.put(key(i), make_block(ns, i))
    assert tier.get(key(0)) is not None and tier.get(key(2)) is not None   # order: 1, 3, 0, 2
    order = tier.keys_lru_order()
    cap = tier.capacity_bytes
    tier.close()

    again = DiskTier(ns, get_codec("raw"), root, cap)
    assert len(again) == 4 and again.used_bytes == dir_bytes(root)
    assert again.keys_lru_order() == order
    for i in range(4):
        got = again.get(key(i))
        assert got is not None and torch.equal(got, make_block(ns, i))
    order = again.keys_lru_order()          # the gets above made it 0, 1, 2, 3
    assert order == [ns.with_codec("raw").storage_key(key(i)) for i in range(4)]
    again.close()

    # A smaller capacity at restart evicts the least recently used entries first.
    smaller = DiskTier(ns, get_codec("raw"), root, cap // 2)
    assert smaller.keys_lru_order() == order[2:] and dir_bytes(root) <= cap // 2


def test_restart_cleans_stale_temp_files_and_ignores_foreign_files(ns: KVNamespace, tmp_path: Path) -> None:
    root = tmp_path / "c"
    DiskTier(ns, get_codec("raw"), root, 1 << 20).close()
    stale = root / "tmp" / "deadbeef.1.0.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = root / "tmp" / "cafe.2.0.tmp"
    fresh.write_bytes(b"in flight")
    (root / "ab").mkdir()
    (root / "ab" / "notes.txt").write_text("not ours")
    tier = DiskTier(ns, get_codec("raw"), root, 1 << 20)
    assert not stale.exists() and fresh.exists()
    assert len(tier) == 0 and (root / "ab" / "notes.txt").exists()


# ---------------------------------------------------------------- corruption


def _stored(ns: KVNamespace, tmp_path: Path, codec: str = "raw") -> tuple[DiskTier, Path]:
    tier = DiskTier(ns, get_codec(codec), tmp_path / "c", 1 << 20)
    tier.put(key(1), make_block(ns, 1))
    return tier, tier.path_for(key(1))


def _assert_dropped(tier: DiskTier, path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        assert tier.get(key(1)) is None
    assert not path.exists() and not tier.contains(key(1))
    assert tier.stats.corrupt == 1 and tier.used_bytes == 0
    assert "dropping bad entry" in caplog.text
    assert tier.get(key(1)) is None   # stays a plain miss afterwards


@pytest.mark.parametrize("where", ["payload", "header", "checksum", "magic"])
def test_flipped_byte_is_detected_and_dropped(
    ns: KVNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    tier, path = _stored(ns, tmp_path)
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[6:8], "little")
    pos = {"payload": len(data) - 3, "header": 100, "checksum": header_len - 1, "magic": 0}[where]
    data[pos] ^= 0x40
    path.write_bytes(bytes(data))
    _assert_dropped(tier, path, caplog)


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1])
def test_truncated_file_is_detected_and_dropped(
    ns: KVNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture, keep: float
) -> None:
    tier, path = _stored(ns, tmp_path)
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:n])
    _assert_dropped(tier, path, caplog)


def plant(src: Path, dst: Path) -> None:
    dst.parent.mkdir(exist_ok=True)
    shutil.copy(src, dst)


def test_wrong_model_namespace_is_a_miss_and_a_planted_file_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ns_a, ns_b = make_ns(model_id="model-a"), make_ns(model_id="model-b")
    root = tmp_path / "c"
    a = DiskTier(ns_a, get_codec("raw"), root, 1 << 20)
    a.put(key(1), make_block(ns_a, 1))
    a.close()
    b = DiskTier(ns_b, get_codec("raw"), root, 1 << 20)
    assert b.get(key(1)) is None and b.stats.corrupt == 0          # different key: plain miss
    # A file of model A placed where model B looks is caught by the header check.
    plant(a.path_for(key(1)), b.path_for(key(1)))
    b.close()   # one open tier per directory (the directory lock)
    b2 = DiskTier(ns_b, get_codec("raw"), root, 1 << 20)
    with caplog.at_level("WARNING"):
        assert b2.get(key(1)) is None
    assert "namespace mismatch" in caplog.text and not b2.path_for(key(1)).exists()
    assert a.path_for(key(1)).exists()   # model A's own entry is untouched


def test_codec_mismatch_is_a_miss_and_a_planted_file_is_dropped(
    ns: KVNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "c"
    raw = DiskTier(ns, get_codec("raw"), root, 1 << 20)
    raw.put(key(1), make_block(ns, 1))
    raw.close()
    q = DiskTier(ns, get_codec("int8"), root, 1 << 20)
    assert q.get(key(1)) is None and q.stats.corrupt == 0
    plant(raw.path_for(key(1)), q.path_for(key(1)))
    q.close()
    q2 = DiskTier(ns, get_codec("int8"), root, 1 << 20)
    with caplog.at_level("WARNING"):
        assert q2.get(key(1)) is None
    assert "codec mismatch" in caplog.text and q2.stats.corrupt == 1


def test_entry_under_the_wrong_key_is_dropped(ns: KVNamespace, tmp_path: Path) -> None:
    tier = DiskTier(ns, get_codec("raw"), tmp_path / "c", 1 << 20)
    tier.put(key(1), make_block(ns, 1))
    tier.put(key(2), make_block(ns, 2))
    shutil.copy(tier.path_for(key(1)), tier.path_for(key(2)))   # same size, valid checksum
    assert tier.get(key(2)) is None and tier.stats.corrupt == 1
    assert tier.get(key(1)) is not None


def test_file_deleted_behind_our_back_is_a_miss(ns: KVNamespace, tmp_path: Path) -> None:
    tier, path = _stored(ns, tmp_path)
    path.unlink()
    assert tier.get(key(1)) is None and not tier.contains(key(1)) and tier.used_bytes == 0


# ---------------------------------------------------------------- disk full


def test_disk_full_evicts_and_retries_once(ns: KVNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tier = DiskTier(ns, get_codec("raw"), tmp_path / "c", 1 << 20)
    for i in range(4):
        tier.put(key(i), make_block(ns, i))
    real_write = tier._write_file
    calls = {"n": 0}

    def full_once(path: Path, header: bytes, payload: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            path.write_bytes(header[:5])   # a partial temp file, as a real ENOSPC leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, header, payload)

    tier._write_file = full_once  # type: ignore[method-assign]
    with caplog.at_level("WARNING"):
        tier.put(key(9), make_block(ns, 9))
    assert calls["n"] == 2 and "disk full" in caplog.text
    assert tier.contains(key(9)) and not tier.contains(key(0))   # LRU made room
    assert tier.stats.evictions >= 1 and tier.stats.dropped_puts == 0
    assert list((tmp_path / "c" / "tmp").iterdir()) == []
    assert dir_bytes(tmp_path / "c") == tier.used_bytes


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_persistent_write_failure_drops_the_put(
    ns: KVNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture, err: int
) -> None:
    tier = DiskTier(ns, get_codec("raw"), tmp_path / "c", 1 << 20)
    tier.put(key(0), make_block(ns, 0))
    calls = {"n": 0}

    def failing(path: Path, header: bytes, payload: bytes) -> None:
        calls["n"] += 1
        raise OSError(err, os.strerror(err))

    tier._write_file = failing  # type: ignore[method-assign]
    with caplog.at_level("WARNING"):
        tier.put(key(1), make_block(ns, 1))       # must not raise
    assert calls["n"] == (2 if err == errno.ENOSPC else 1)   # retry only when the disk is full
    assert not tier.contains(key(1)) and tier.stats.dropped_puts == 1 and tier.stats.errors == 1
    assert "dropping put" in caplog.text
    assert dir_bytes(tmp_path / "c") == tier.used_bytes
    assert list((tmp_path / "c" / "tmp").iterdir()) == []


def test_oversized_entry_is_dropped(ns: KVNamespace, tmp_path: Path) -> None:
    tier = DiskTier(ns, get_codec("raw"), tmp_path / "c", 100)
    tier.put(key(1), make_block(ns))
    assert not tier.contains(key(1)) and tier.stats.dropped_puts == 1 and dir_bytes(tmp_path / "c") == 0


def test_lossy_codec_on_disk(tmp_path: Path) -> None:
    ns = make_ns(torch.bfloat16, num_layers=3, block_size=16, head_dim=32)
    for codec in ["int8", "fp8", "cachegen"]:
        tier = DiskTier(ns, get_codec(codec), tmp_path / codec, 1 << 20)
        b = make_block(ns, 7)
        tier.put(key(7), b)
        assert tier.path_for(key(7)).stat().st_size < ns.block_nbytes
        got = tier.get(key(7))
        assert got is not None and got.dtype == torch.bfloat16
        assert float((got.float() - b.float()).norm() / b.float().norm()) < 0.05


# ---------------------------------------------------------------- healing (issue 12, item 3)


def test_put_rewrites_an_entry_the_scan_found_until_it_is_read(ns: KVNamespace, tmp_path: Path) -> None:
    root = tmp_path / "c"
    tier = DiskTier(ns, get_codec("raw"), root, 1 << 20)
    for i in range(3):
        tier.put(key(i), make_block(ns, i))
    tier.close()
    bad = tier.path_for(key(1))
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0x40                      # corrupt, but never read: the index still holds it
    bad.write_bytes(bytes(data))

    again = DiskTier(ns, get_codec("raw"), root, 1 << 20)
    assert again.num_unverified == 3
    assert again.get(key(0)) is not None  # read: verified
    assert again.num_unverified == 2
    used = again.used_bytes
    for i in range(3):                    # the engine re-saves recomputed blocks
        again.put(key(i), make_block(ns, i))
    # key 0 was verified: only its recency moved; keys 1 and 2 were rewritten.
    assert again.stats.bytes_written == 2 * bad.stat().st_size
    assert again.num_unverified == 0 and again.used_bytes == used == dir_bytes(root)
    got = again.get(key(1))
    assert got is not None and torch.equal(got, make_block(ns, 1)) and again.stats.corrupt == 0
    again.put(key(1), make_block(ns, 1))  # now verified: no more writes
    assert again.stats.bytes_written == 2 * bad.stat().st_size


def test_a_key_found_corrupt_is_dropped_and_written_by_the_next_put(ns: KVNamespace, tmp_path: Path) -> None:
    tier, path = _stored(ns, tmp_path)
    path.write_bytes(path.read_bytes()[:-1])
    assert tier.get(key(1)) is None and not tier.contains(key(1))
    tier.put(key(1), make_block(ns, 1))
    got = tier.get(key(1))
    assert got is not None and torch.equal(got, make_block(ns, 1))


# ---------------------------------------------------------------- one tier per directory (item 4)


def test_a_second_tier_on_the_directory_is_refused_until_the_first_closes(ns: KVNamespace, tmp_path: Path) -> None:
    from kvserve.kv_store.dir_lock import DiskTierLockedError

    root = tmp_path / "c"
    first = DiskTier(ns, get_codec("raw"), root, 1 << 20)
    with pytest.raises(DiskTierLockedError, match="in use by another disk tier of this process"):
        DiskTier(make_ns(model_id="other"), get_codec("raw"), root, 1 << 20)  # any namespace
    first.close()
    first.close()  # idempotent
    DiskTier(ns, get_codec("raw"), root, 1 << 20).close()


def test_a_tier_dropped_without_close_releases_the_directory(ns: KVNamespace, tmp_path: Path) -> None:
    import gc

    root = tmp_path / "c"
    tier = DiskTier(ns, get_codec("raw"), root, 1 << 20)
    del tier
    gc.collect()
    DiskTier(ns, get_codec("raw"), root, 1 << 20).close()


def test_another_process_holding_the_directory_gets_a_clear_error(ns: KVNamespace, tmp_path: Path) -> None:
    """Two processes on one directory used to overrun its cap (each counts only its own files)."""
    import subprocess
    import sys

    from kvserve.kv_store.dir_lock import DiskTierLockedError

    root = tmp_path / "c"
    code = ("import sys; from kvserve.kv_store import DiskTier, get_codec; "
            "from tests.unit.kv_store.kvstore_helpers import make_ns; "
            f"t = DiskTier(make_ns(), get_codec('raw'), {str(root)!r}, 1 << 20); "
            "print('open', flush=True); sys.stdin.read(); t.close()")
    repo = Path(__file__).resolve().parents[3]
    env = dict(os.environ, PYTHONPATH=str(repo))
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=repo, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(DiskTierLockedError, match=f"in use by process {holder.pid}"):
            DiskTier(ns, get_codec("raw"), root, 1 << 20)
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    DiskTier(ns, get_codec("raw"), root, 1 << 20).close()   # free once it closed
