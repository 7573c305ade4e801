"""KV cache tiers behind one interface: host memory, disk, Redis; codecs raw/int8/fp8/cachegen.

Typical engine use:

    from kvserve.kv_store import KVNamespace, build_kv_store

    ns = KVNamespace.create(model_id, torch.bfloat16, num_layers, num_kv_heads, head_dim, block_size)
    store = build_kv_store("cpu:4GiB,disk:/var/cache/kvserve:20GiB", ns, codec="raw")
    store.put(block_hash, block)            # block: [L, 2, block_size, H, D] on the host
    block = store.get(block_hash)           # None on a miss
    n = store.longest_prefix(block_hashes)  # leading blocks held by some tier

See kv_store/README.md.
"""
from kvserve.kv_store.base import KVBlock, KVStore, KVTier, TierStats
from kvserve.kv_store.codecs import Codec, CodecError, available_codecs, get_codec, register_codec
from kvserve.kv_store.cpu_tier import CpuTier
from kvserve.kv_store.disk_tier import DiskTier
from kvserve.kv_store.namespace import KVNamespace, model_fingerprint
from kvserve.kv_store.registry import (
    TierSpec,
    build_kv_store,
    create_tier,
    parse_size,
    parse_tier_spec,
    register_tier,
)
from kvserve.kv_store.tiered import TieredKVStore, WritePolicy

__all__ = [
    "Codec", "CodecError", "CpuTier", "DiskTier", "KVBlock", "KVNamespace", "KVStore", "KVTier",
    "TierSpec", "TierStats", "TieredKVStore", "WritePolicy", "available_codecs", "build_kv_store",
    "create_tier", "get_codec", "model_fingerprint", "parse_size", "parse_tier_spec",
    "register_codec", "register_tier",
]
