"""Self-describing container for one stored block (disk files and Redis values).

Layout (little-endian):

    offset  size  field
    0       4     magic  b"KVSB"
    4       2     format version (FORMAT_VERSION)
    6       2     header length in bytes, checksum included
    8       32    namespace digest (KVNamespace.digest(), codec included)
    40      32    block hash (the engine's key, so a file can be demoted / audited)
    72      1+n   codec identity, u8 length + ASCII
    ..      1+n   dtype name, u8 length + ASCII
    ..      1+4k  shape: u8 ndim + k x u32
    ..      8     payload length
    ..      16    checksum: BLAKE2b-128 over every header byte before it + payload
    header_len    payload (codec output)

The checksum covers the header fields too, so a flipped bit anywhere, a
truncated file, or a payload of the wrong length is detected before the
payload reaches a codec.  Readers then check that namespace, codec, dtype and
shape are the ones they expect; any failure raises CorruptEntry and the caller
drops the entry.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

MAGIC = b"KVSB"
FORMAT_VERSION = 1
CHECKSUM_BYTES = 16

_FIXED = struct.Struct("<4sHH32s32s")  # magic, version, header_len, ns digest, block hash
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class CorruptEntry(Exception):
    """A stored entry failed validation; the message says which check."""


@dataclass(frozen=True, slots=True)
class EntryHeader:
    namespace_digest: bytes
    block_hash: bytes
    codec: str
    dtype: str
    shape: tuple[int, ...]
    payload_len: int


def _checksum(*parts: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=CHECKSUM_BYTES)
    for p in parts:
        h.update(p)
    return h.digest()


def _short_str(s: str) -> bytes:
    b = s.encode("ascii")
    if len(b) > 255:
        raise ValueError(f"header string too long: {s!r}")
    return _U8.pack(len(b)) + b


def pack_header(h: EntryHeader, payload: bytes | memoryview) -> bytes:
    """Header bytes (checksum included) for `payload`; write header then payload."""
    if len(h.namespace_digest) != 32 or len(h.block_hash) != 32:
        raise ValueError("namespace digest and block hash must be 32 bytes")
    body = b"".join([
        _short_str(h.codec),
        _short_str(h.dtype),
        _U8.pack(len(h.shape)),
        b"".join(_U32.pack(d) for d in h.shape),
        _U64.pack(len(payload)),
    ])
    header_len = _FIXED.size + len(body) + CHECKSUM_BYTES
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, header_len, h.namespace_digest, h.block_hash)
    return fixed + body + _checksum(fixed, body, payload)


def pack_entry(h: EntryHeader, payload: bytes | memoryview) -> bytes:
    return pack_header(h, payload) + bytes(payload)


def unpack_entry(data: bytes | memoryview) -> tuple[EntryHeader, memoryview]:
    """Parse and verify one entry; returns the header and a view of the payload.

    Raises CorruptEntry on bad magic/version, truncation, trailing bytes or a
    checksum mismatch.  Does not check *which* namespace it belongs to; see
    `check_header`.
    """
    mv = memoryview(data)
    if len(mv) < _FIXED.size:
        raise CorruptEntry(f"truncated: {len(mv)} bytes, shorter than the fixed header")
    magic, version, header_len, ns, bh = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptEntry(f"bad magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"unsupported format version {version}")
    if header_len > len(mv) or header_len < _FIXED.size + CHECKSUM_BYTES + 3 + 8:
        raise CorruptEntry(f"truncated or bad header length {header_len} (entry is {len(mv)} bytes)")
    try:
        off = _FIXED.size
        fields: list[str] = []
        for _ in range(2):
            (n,) = _U8.unpack_from(mv, off)
            fields.append(bytes(mv[off + 1:off + 1 + n]).decode("ascii"))
            off += 1 + n
        (ndim,) = _U8.unpack_from(mv, off)
        off += 1
        shape = tuple(_U32.unpack_from(mv, off + 4 * i)[0] for i in range(ndim))
        off += 4 * ndim
        (payload_len,) = _U64.unpack_from(mv, off)
        off += 8
    except (struct.error, UnicodeDecodeError) as e:
        raise CorruptEntry(f"unparsable header: {e}") from None
    if off + CHECKSUM_BYTES != header_len:
        raise CorruptEntry("header length does not match its fields")
    if header_len + payload_len != len(mv):
        raise CorruptEntry(
            f"size mismatch: header says {header_len + payload_len} bytes, entry has {len(mv)}"
            " (truncated or trailing data)")
    stored_sum = bytes(mv[off:header_len])
    payload = mv[header_len:]
    if _checksum(mv[:off], payload) != stored_sum:
        raise CorruptEntry("checksum mismatch")
    header = EntryHeader(bytes(ns), bytes(bh), fields[0], fields[1], shape, payload_len)
    return header, payload


def check_header(
    h: EntryHeader,
    *,
    namespace_digest: bytes,
    codec: str,
    dtype: str,
    shape: tuple[int, ...],
    block_hash: bytes | None = None,
) -> None:
    """Raise CorruptEntry unless the entry belongs to this namespace/codec/key."""
    if h.codec != codec:
        raise CorruptEntry(f"codec mismatch: entry {h.codec!r}, expected {codec!r}")
    if h.namespace_digest != namespace_digest:
        raise CorruptEntry("namespace mismatch (another model, dtype, layout or codec)")
    if h.dtype != dtype or tuple(h.shape) != tuple(shape):
        raise CorruptEntry(f"dtype/shape mismatch: entry {h.dtype}{list(h.shape)}, expected {dtype}{list(shape)}")
    if block_hash is not None and h.block_hash != block_hash:
        raise CorruptEntry("block hash mismatch (entry stored under the wrong key)")
