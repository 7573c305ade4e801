"""Messages between the API process and the engine process.

Everything here is plain data (ints, floats, strs, lists, small dataclasses
of those, and `SamplingParams`, itself a dataclass of plain values) so it
pickles cheaply and carries no tensors or live objects.  One message travels
as one `send_bytes` of a pickle; the engine batches what it sends per step.

    API -> engine:  list[AddRequest | AbortRequests | Shutdown]  (one batch per send)
    engine -> API:  Ready | StartupFailed, then StepOutputs per loop iteration
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Optional

from kvserve.request import SLO
from kvserve.sampling_params import SamplingParams

# (token_id, logprob, rank, decoded_token) for one candidate at one position.
LogprobEntry = tuple[int, float, Optional[int], str]
# Candidates at one position, most likely first (the sampled token is among them).
PositionLogprobs = list[LogprobEntry]


# ------------------------------------------------------------------ API -> engine
@dataclass(slots=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt_text: Optional[str] = None
    arrival_time: Optional[float] = None  # time.time() when the API received it
    priority: int = 0  # lower first (the "priority" policy)
    tenant: Optional[str] = None  # the OpenAI `user` (or `tenant`) field (the "fair" policy)
    slo: Optional[SLO] = None  # latency targets (the "slo" policy)
    kv_transfer_params: Optional[dict[str, Any]] = None  # P/D disaggregation (kvserve/disagg/params.py)
    segment_lens: Optional[list[int]] = None  # CacheBlend: the prompt as segments (docs/cacheblend.md)


@dataclass(slots=True)
class AbortRequests:
    request_ids: list[str]


@dataclass(slots=True)
class Shutdown:
    pass


# ------------------------------------------------------------------ engine -> API
@dataclass(slots=True)
class EngineInfo:
    """What the API process needs to validate requests before sending them."""

    model_dir: str
    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int
    pid: int


@dataclass(slots=True)
class Ready:
    info: EngineInfo


@dataclass(slots=True)
class StartupFailed:
    error: str  # "ExceptionType: message"


@dataclass(slots=True)
class SampleDelta:
    """What one sample (choice) gained since the last delta for its request."""

    index: int
    text: str  # new visible text (held-back stop-string prefixes are released later)
    token_ids: list[int]  # new token ids
    logprobs: Optional[list[PositionLogprobs]] = None  # one entry per new token
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error" once finished
    stop_reason: Optional[str | int] = None


@dataclass(slots=True)
class RequestDelta:
    request_id: str
    samples: list[SampleDelta] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    # Sent once, in the first delta after they are computed (echo with logprobs).
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = None
    error: Optional[str] = None
    # True when the engine refused the request at add time (a client error, not a crash).
    rejected: bool = False
    # Set with `rejected` when the scheduling policy refused it for now (a 429 with Retry-After).
    retry_after_s: Optional[float] = None
    # A prefill instance's answer for a decode instance (kvserve/disagg/params.py), with the last delta.
    kv_transfer_params: Optional[dict[str, Any]] = None


@dataclass(slots=True)
class EngineStatsSnapshot:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks held by requests, in [0, 1]
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0  # tokens found there (cumulative)
    num_preemptions: int = 0  # cumulative
    preemptions_by: dict[str, int] = field(default_factory=dict)  # "cause/mode" -> cumulative count
    num_steps: int = 0  # cumulative
    num_step_failures: int = 0  # cumulative: steps whose exception escaped the engine
    # LLMEngine.kv_tier_stats(): per-tier counters ("0:cpu" -> hits, bytes_read, ...), the offload
    # and I/O counters (all cumulative, plain ints/floats/strs); None without KV offload tiers.
    kv_tiers: Optional[dict[str, Any]] = None
    # SpecDecodeMetrics.as_dict() (cumulative); None without speculative decoding.
    spec_decode: Optional[dict[str, Any]] = None
    # DisaggEngine.stats(): role, transfer outcomes and tokens, prompt tokens computed (cumulative).
    disagg: Optional[dict[str, Any]] = None
    # ChunkStats of CacheBlend's chunk cache (kvserve/blend/chunk_source.py; cumulative).
    cacheblend: Optional[dict[str, Any]] = None


@dataclass(slots=True)
class StepOutputs:
    deltas: list[RequestDelta]
    stats: EngineStatsSnapshot
    # Prefix-cache changes since the last message, in order (core/kv_events.py KVEventRecords:
    # (kind, [32-byte hashes])); None unless the engine runs with kv_events on.
    kv_events: Optional[list[tuple[str, list[bytes]]]] = None


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)
