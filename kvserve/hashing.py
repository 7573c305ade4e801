"""Block hashes: the one name a KV block has in every cache tier (imported as kvserve.core.hashing too).

A block's hash chains over its parent block's hash, so equal hashes mean equal
*prefixes*, not only equal block contents.  The same function names a block in
the device prefix cache and in every offload tier (host memory, disk, Redis),
so a block found anywhere is the same block.

The digest is SHA-256 over a fixed byte encoding, stable across processes and
Python versions (unlike `hash()`), which the disk and Redis tiers rely on.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Sequence

import numpy as np

BlockHash = bytes  # 32-byte SHA-256 digest

# Root "parent" for the first block of every sequence.  A namespace (model
# identity, dtype, ...) may be mixed in by callers through `extra_keys`.
ROOT_HASH: BlockHash = hashlib.sha256(b"kvserve-root-v1").digest()


def hash_block(
    parent_hash: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: bytes = b"",
) -> BlockHash:
    """Hash of one full block given its parent's hash and its tokens."""
    h = hashlib.sha256()
    h.update(parent_hash if parent_hash is not None else ROOT_HASH)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra_keys:
        h.update(struct.pack("<I", len(extra_keys)))
        h.update(extra_keys)
    return h.digest()


def hash_block_tokens(
    token_ids: Sequence[int],
    block_size: int,
    parent_hash: BlockHash | None = None,
    extra_keys: bytes = b"",
) -> list[BlockHash]:
    """Chained hashes of every *full* block of `token_ids` (a partial tail block has none)."""
    hashes: list[BlockHash] = []
    num_full = len(token_ids) // block_size
    prev = parent_hash
    for i in range(num_full):
        prev = hash_block(prev, token_ids[i * block_size:(i + 1) * block_size], extra_keys)
        hashes.append(prev)
    return hashes
