"""Engine configuration: frozen dataclasses validated on construction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Accepted dtype names -> the canonical name (a torch attribute).  Plain strings, so
# that this module, and the core that imports it, never import torch; the torch
# dtype is resolved on the device side (kvserve.worker.dtypes.parse_dtype).
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def canonical_dtype(dtype: str) -> str:
    """"fp16" -> "float16"; a clear ValueError for an unknown name."""
    try:
        return DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}") from None


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Exactly one of these sizes the pool; with neither, a default budget is used.
    kv_cache_memory: Optional[int] = None  # bytes for K and V of all layers
    num_kv_blocks: Optional[int] = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    policy: str = "fcfs"  # "fcfs" | "priority"
    # Prefill chunks are limited to this many tokens per request per step
    # (0: only the step budget limits them).
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class KVTierConfig:
    """KV offload tiers below the device pool (see docs/kv_tiers.md).

    tiers: a kv_store spec, fastest first, e.g. "cpu:4GiB,disk:/var/cache/kvserve:20GiB"
        (also "redis://HOST:PORT/DB"); None or "" disables offloading.
    codec: default codec of every tier ("raw", "int8", "fp8", "cachegen[-...]"); a tier
        may override it with ":codec=NAME".
    offload_policy: "evict" saves a cached block when the device pool evicts it for
        reuse; "finish" saves a request's full blocks when it finishes.
    write_policy: the store's "write_through" (every tier on each save) or "demote".
    """

    tiers: Optional[str] = None
    codec: str = "raw"
    offload_policy: str = "evict"
    write_policy: str = "write_through"
    # Only fetch from the tiers when at least this many blocks beyond the device hit are there.
    min_load_blocks: int = 1
    # Host memory the saver may hold in copied-out blocks before it drops new saves.
    max_pending_save_bytes: int = 256 * 1024**2

    @property
    def enabled(self) -> bool:
        return bool(self.tiers and self.tiers.strip())

    def __post_init__(self) -> None:
        if self.offload_policy not in ("evict", "finish"):
            raise ValueError(f"kv_offload_policy must be 'evict' or 'finish', got {self.offload_policy!r}")
        if self.write_policy not in ("write_through", "demote"):
            raise ValueError(f"kv tier write_policy must be 'write_through' or 'demote', got {self.write_policy!r}")
        if not self.codec:
            raise ValueError("kv_codec must be a codec name such as 'raw', 'int8', 'fp8' or 'cachegen'")
        if self.min_load_blocks < 1:
            raise ValueError(f"min_load_blocks must be >= 1, got {self.min_load_blocks}")
        if self.max_pending_save_bytes < 0:
            raise ValueError(f"max_pending_save_bytes must be >= 0, got {self.max_pending_save_bytes}")
