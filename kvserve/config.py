"""Engine configuration: frozen dataclasses validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from kvserve.disagg.config import DisaggConfig
from kvserve.spec_decode.config import SpeculativeConfig

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
    # CacheBlend (kvserve/blend/): fraction of a prompt's cached document-chunk tokens recomputed.
    blend_recompute_ratio: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 <= self.blend_recompute_ratio <= 1.0:
            raise ValueError(f"blend_recompute_ratio must be in [0, 1], got {self.blend_recompute_ratio}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")


def parse_tenant_weights(spec: Optional[str]) -> dict[str, float]:
    """"a=2,b=1" -> {"a": 2.0, "b": 1.0}; a clear ValueError for a bad entry."""
    out: dict[str, float] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name.strip() or not weight > 0:
            raise ValueError(f"tenant weights are NAME=WEIGHT pairs with WEIGHT > 0, e.g. 'a=2,b=1'; got {part!r}")
        out[name.strip()] = weight
    return out


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    # None: the model's own limit, capped by what the KV pool holds (EngineCore.from_config resolves it).
    max_model_len: Optional[int] = None
    policy: str = "fcfs"  # "fcfs" | "priority" | "fair" | "slo" (docs/scheduling.md)
    # Prefill chunks are limited to this many tokens per request per step
    # (0: only the step budget limits them).
    long_prefill_token_threshold: int = 0
    # Policy options (each policy takes those it knows): "fair"'s per-tenant weights
    # ("a=2,b=1"); "slo"'s default targets for requests without their own, whether to
    # refuse (429) a request that cannot meet its TTFT, and the age bound.
    tenant_weights: Optional[str] = None
    default_slo_ttft_s: Optional[float] = None
    default_slo_tpot_s: Optional[float] = None
    slo_reject: bool = False
    max_wait_s: float = 60.0
    # "fair": while two or more tenants have requests, a step holds at most what takes this
    # long by the measured step time (0: off; core/policies_fair.py).
    fair_max_step_s: float = 0.2
    # Preemption: "recompute", "swap" (to a host buffer of swap_space_bytes) or "auto"
    # (per victim, whichever the cost model says is cheaper; core/swap.py).
    preemption_mode: str = "recompute"
    swap_space_bytes: int = 4 * 1024**3

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.preemption_mode not in ("recompute", "swap", "auto"):
            raise ValueError(f"preemption_mode must be 'recompute', 'swap' or 'auto', got {self.preemption_mode!r}")
        if self.swap_space_bytes < 0:
            raise ValueError(f"swap_space_bytes must be >= 0, got {self.swap_space_bytes}")
        for name in ("default_slo_ttft_s", "default_slo_tpot_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {v!r}")
        if not self.max_wait_s > 0:
            raise ValueError(f"max_wait_s must be > 0 seconds, got {self.max_wait_s!r}")
        if not self.fair_max_step_s >= 0:
            raise ValueError(f"fair_max_step_s must be >= 0 seconds (0: off), got {self.fair_max_step_s!r}")
        parse_tenant_weights(self.tenant_weights)

    def policy_options(self) -> dict[str, object]:
        """Keyword arguments for make_policy (each policy takes the ones it knows)."""
        return dict(tenant_weights=parse_tenant_weights(self.tenant_weights),
                    default_ttft_s=self.default_slo_ttft_s, default_tpot_s=self.default_slo_tpot_s,
                    reject=self.slo_reject, max_wait_s=self.max_wait_s, contended_step_s=self.fair_max_step_s)


# When blocks go down to the KV tiers (KVTierConfig.offload_policy; the server's --kv-offload-policy).
OFFLOAD_POLICIES = ("auto", "evict", "finish")


@dataclass(frozen=True)
class KVTierConfig:
    """KV offload tiers below the device pool (see docs/kv_tiers.md).

    tiers: a kv_store spec, fastest first, e.g. "cpu:4GiB,disk:/var/cache/kvserve:20GiB"
        (also "redis://HOST:PORT/DB"); None or "" disables offloading.
    codec: default codec of every tier ("raw", "int8", "fp8", "cachegen[-...]"); a tier
        may override it with ":codec=NAME".
    offload_policy: "evict" saves a cached block when the device pool evicts it for
        reuse; "finish" saves a request's full blocks when it finishes; "auto" (the
        default) is "finish" when some tier is persistent (disk, Redis), so a restart
        finds what was computed, and "evict" for memory-only tiers.  Whatever the
        policy, closing the engine also writes its still-cached device blocks to the
        persistent tiers.
    write_policy: the store's "write_through" (every tier on each save) or "demote".
    """

    tiers: Optional[str] = None
    codec: str = "raw"
    offload_policy: str = "auto"
    write_policy: str = "write_through"
    # Only fetch from the tiers when at least this many blocks beyond the device hit are there.
    min_load_blocks: int = 1
    # Host memory the saver may hold in copied-out blocks before it drops new saves.
    max_pending_save_bytes: int = 256 * 1024**2
    # Closing the engine waits at most this long for queued saves and the flush of device blocks.
    close_timeout_s: float = 60.0

    @property
    def enabled(self) -> bool:
        return bool(self.tiers and self.tiers.strip())

    def __post_init__(self) -> None:
        if self.offload_policy not in OFFLOAD_POLICIES:
            raise ValueError(f"kv_offload_policy must be one of {list(OFFLOAD_POLICIES)}, "
                             f"got {self.offload_policy!r}")
        if self.write_policy not in ("write_through", "demote"):
            raise ValueError(f"kv tier write_policy must be 'write_through' or 'demote', got {self.write_policy!r}")
        if not self.codec:
            raise ValueError("kv_codec must be a codec name such as 'raw', 'int8', 'fp8' or 'cachegen'")
        if self.min_load_blocks < 1:
            raise ValueError(f"min_load_blocks must be >= 1, got {self.min_load_blocks}")
        if self.max_pending_save_bytes < 0:
            raise ValueError(f"max_pending_save_bytes must be >= 0, got {self.max_pending_save_bytes}")
        if not self.close_timeout_s >= 0:
            raise ValueError(f"close_timeout_s must be >= 0, got {self.close_timeout_s}")


@dataclass(frozen=True)
class ModelConfig:
    """Which weights, in which dtype; `model` is a resolved local model directory."""

    model: str
    tokenizer: Optional[str] = None  # a tokenizer directory other than the model's
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"
    attention_backend: str = "auto"  # see kvserve.worker.attention


@dataclass(frozen=True)
class EngineConfig:
    """Every setting of one engine, passed whole from LLMEngine down to the components:
    each component takes the config object it needs, never a copy field by field."""

    model: ModelConfig
    device: DeviceConfig = DeviceConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    kv_tiers: KVTierConfig = KVTierConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()  # speculative decoding (off by default)
    disagg: DisaggConfig = DisaggConfig()  # prefill/decode role and KV transfer (docs/disaggregation.md)


@dataclass
class EngineArgs:
    """The user-facing engine keyword arguments, named like vLLM's (`LLM(model, **kwargs)`,
    the server's engine kwargs), turned into an EngineConfig by `create_engine_config`."""

    model: Optional[str] = None
    tokenizer: Optional[str] = None
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    kv_cache_memory: Optional[int] = None
    num_kv_blocks: Optional[int] = None
    enable_prefix_caching: bool = True
    blend_recompute_ratio: float = 0.15  # CacheBlend: share of cached chunk tokens recomputed (docs/cacheblend.md)
    seed: int = 0
    max_model_len: Optional[int] = None  # None: the model's own limit, capped by what the KV pool holds
    scheduling_policy: str = "fcfs"
    tenant_weights: Optional[str] = None  # "fair": "a=2,b=1"
    default_slo_ttft_ms: Optional[float] = None  # "slo": targets of requests without their own
    default_slo_tpot_ms: Optional[float] = None
    slo_reject: bool = False  # "slo": refuse a request that cannot meet its TTFT
    fair_max_step_ms: float = 200.0  # "fair": the longest step while tenants compete (0: off)
    preemption_mode: str = "recompute"  # recompute | swap | auto
    swap_space: float = 4.0  # GiB of host memory for swapped-out KV blocks
    attention_backend: str = "auto"
    long_prefill_token_threshold: int = 0
    kv_tiers: Optional[str] = None
    kv_codec: str = "raw"
    kv_offload_policy: str = "auto"
    kv_tier_write_policy: str = "write_through"
    speculative_method: Optional[str] = None  # ngram | suffix | draft:PATH (docs/spec_decode.md); None: off
    num_speculative_tokens: int = 4  # the most drafts per request per step
    speculative_adaptive: bool = True  # choose k per request per step (SmartSpec goodput)
    role: str = "both"  # both | prefill | decode (docs/disaggregation.md)
    kv_transfer: str = "shm://"  # how KV crosses to a decode instance: shm://[DIR] | ray://[ADDRESS]
    kv_transfer_timeout: float = 30.0  # seconds a transfer may take (and an export is kept)

    @classmethod
    def from_kwargs(cls, model: Optional[str] = None, **kwargs: object) -> EngineArgs:
        """EngineArgs from keyword arguments; a TypeError names every unknown one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; see kvserve.config.EngineArgs")
        return cls(model=model, **kwargs)  # type: ignore[arg-type]

    def create_engine_config(self, model_dir: str) -> EngineConfig:
        """Validate every value (ValueError names the bad one) and group them by component."""
        scheduler_kwargs: dict[str, object] = dict(
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            policy=self.scheduling_policy, long_prefill_token_threshold=self.long_prefill_token_threshold,
            tenant_weights=self.tenant_weights, slo_reject=self.slo_reject, preemption_mode=self.preemption_mode,
            fair_max_step_s=self.fair_max_step_ms / 1000,
            default_slo_ttft_s=None if self.default_slo_ttft_ms is None else self.default_slo_ttft_ms / 1000,
            default_slo_tpot_s=None if self.default_slo_tpot_ms is None else self.default_slo_tpot_ms / 1000,
            swap_space_bytes=int(self.swap_space * 1024**3))
        if self.max_model_len is not None:
            scheduler_kwargs["max_model_len"] = self.max_model_len
        return EngineConfig(
            model=ModelConfig(model=model_dir, tokenizer=self.tokenizer, dtype=self.dtype, seed=self.seed),
            device=DeviceConfig(device=self.device, attention_backend=self.attention_backend),
            cache=CacheConfig(block_size=self.block_size, kv_cache_memory=self.kv_cache_memory,
                              num_kv_blocks=self.num_kv_blocks, enable_prefix_caching=self.enable_prefix_caching,
                              blend_recompute_ratio=self.blend_recompute_ratio),
            scheduler=SchedulerConfig(**scheduler_kwargs),  # type: ignore[arg-type]
            kv_tiers=KVTierConfig(tiers=self.kv_tiers, codec=self.kv_codec, offload_policy=self.kv_offload_policy,
                                  write_policy=self.kv_tier_write_policy),
            speculative=SpeculativeConfig(method=self.speculative_method,
                                          num_speculative_tokens=self.num_speculative_tokens,
                                          adaptive=self.speculative_adaptive),
            disagg=DisaggConfig(role=self.role, kv_transfer=self.kv_transfer, timeout_s=self.kv_transfer_timeout),
        )
