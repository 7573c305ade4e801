"""Re-export of `kvserve.hashing` (block hashes), where the KV tiers and older code import it from.

The implementation lives one level up so that `request.py` (plain per-request
data, below the core) can hash its blocks without importing the core.
"""
from __future__ import annotations

from kvserve.hashing import ROOT_HASH, BlockHash, hash_block, hash_block_tokens

__all__ = ["ROOT_HASH", "BlockHash", "hash_block", "hash_block_tokens"]
