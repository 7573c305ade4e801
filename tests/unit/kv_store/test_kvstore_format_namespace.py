"""Namespace identity and the stored-entry container."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kvserve.kv_store import KVNamespace, model_fingerprint
from kvserve.kv_store.file_format import (
    CorruptEntry,
    EntryHeader,
    check_header,
    pack_entry,
    unpack_entry,
)
from tests.unit.kv_store.kvstore_helpers import key, make_block, make_ns

# ---------------------------------------------------------------- namespace


def test_namespace_digest_is_stable_and_covers_every_field() -> None:
    base = KVNamespace.create("m", torch.bfloat16, 4, 2, 64, 16)
    assert base.digest() == KVNamespace.create("m", torch.bfloat16, 4, 2, 64, 16).digest()
    variants = [
        dataclasses.replace(base, model_id="m2"),
        dataclasses.replace(base, dtype="float16"),
        dataclasses.replace(base, num_layers=5),
        dataclasses.replace(base, num_kv_heads=4),
        dataclasses.replace(base, head_dim=128),
        dataclasses.replace(base, block_size=32),
        dataclasses.replace(base, extra="tp=2/rank=1"),
        base.with_codec("int8-kchan-vtok-v1"),
    ]
    digests = {v.digest() for v in variants} | {base.digest()}
    assert len(digests) == len(variants) + 1
    # Same block hash, different namespace -> different storage key.
    assert len({v.storage_key(key(0)) for v in [base, *variants]}) == len(variants) + 1


def test_namespace_validation_and_block_check() -> None:
    with pytest.raises(ValueError):
        KVNamespace.create("m", torch.int8, 1, 1, 1, 1)
    with pytest.raises(ValueError):
        KVNamespace.create("", torch.float32, 1, 1, 1, 1)
    with pytest.raises(ValueError):
        KVNamespace.create("m", torch.float32, 0, 1, 1, 1)
    ns = make_ns()
    ns.check_block(make_block(ns))
    with pytest.raises(ValueError, match="shape"):
        ns.check_block(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="dtype"):
        ns.check_block(make_block(ns).half())
    assert ns.block_nbytes == make_block(ns).numel() * 4


def test_model_fingerprint_sees_weight_changes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    w = tmp_path / "model.safetensors"
    data = bytearray(range(256)) * 4096  # 1 MiB
    w.write_bytes(data)
    fp1 = model_fingerprint(tmp_path)
    assert fp1 == model_fingerprint(tmp_path)
    data[0] ^= 1   # offset 0 is always sampled
    w.write_bytes(data)
    assert model_fingerprint(tmp_path) != fp1
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 16}))
    assert len({fp1, model_fingerprint(tmp_path)}) == 2


# ---------------------------------------------------------------- container


def _entry(payload: bytes = b"payload-bytes" * 3) -> tuple[EntryHeader, bytes]:
    h = EntryHeader(b"N" * 32, b"K" * 32, "raw", "float32", (2, 2, 4, 2, 8), len(payload))
    return h, pack_entry(h, payload)


def test_entry_roundtrip() -> None:
    h, blob = _entry()
    h2, payload = unpack_entry(blob)
    assert h2 == h and bytes(payload) == b"payload-bytes" * 3


def test_every_single_bit_flip_is_detected() -> None:
    _, blob = _entry()
    for pos in range(len(blob)):
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            with pytest.raises(CorruptEntry):
                unpack_entry(bytes(bad))


def test_every_truncation_and_extension_is_detected() -> None:
    _, blob = _entry()
    for n in range(len(blob)):
        with pytest.raises(CorruptEntry):
            unpack_entry(blob[:n])
    with pytest.raises(CorruptEntry, match="size mismatch"):
        unpack_entry(blob + b"\0")


def test_check_header_rejects_other_namespace_codec_shape_and_key() -> None:
    h, _ = _entry()
    ok = dict(namespace_digest=b"N" * 32, codec="raw", dtype="float32", shape=(2, 2, 4, 2, 8),
              block_hash=b"K" * 32)
    check_header(h, **ok)
    for field, value, msg in [
        ("namespace_digest", b"X" * 32, "namespace"),
        ("codec", "int8", "codec"),
        ("dtype", "float16", "dtype"),
        ("shape", (2, 2, 4, 2, 4), "shape"),
        ("block_hash", b"Z" * 32, "block hash"),
    ]:
        with pytest.raises(CorruptEntry, match=msg):
            check_header(h, **{**ok, field: value})
