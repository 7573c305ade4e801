"""Request: the engine's per-sequence state.

The one scheduling rule: `num_computed_tokens` catches up to `num_tokens`.
Chunked prefill, prefix-cache hits and preemption by recompute are all just
"how many tokens this request runs this step".
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from kvserve.hashing import BlockHash, hash_block
from kvserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Fetching prefix blocks from an offload tier; skipped by admission until ready.
    WAITING_FOR_KV = 3
    # Everything from here on is finished.
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> Optional[str]:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
        }.get(self)


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency targets of one request (plain data for SLO-aware policies); None: no target."""

    ttft_s: Optional[float] = None  # time to first token, from arrival
    tpot_s: Optional[float] = None  # time per output token after the first

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"slo {name} must be > 0 seconds, got {v!r}")


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0  # on the scheduler's clock; the engine stamps it on arrival
    priority: int = 0  # lower value is served first (as in vLLM)
    tenant: Optional[str] = None  # who the request is accounted to (fair-share policies)
    slo: Optional[SLO] = None
    # For n > 1: the id of the user-facing request and this sample's index.
    parent_id: Optional[str] = None
    sample_index: int = 0
    # How many samples this request still has to fork into when its prompt
    # completes (n for a fresh n > 1 request, 1 after the fork).
    num_samples_to_fork: int = 1
    block_size: int = 16
    hash_extra_keys: bytes = b""
    # CacheBlend (kvserve/blend/): the prompt as segments (their token counts: the first
    # goes through the prefix cache, the middle ones are document chunks, the last is the
    # question), and the fraction of chunk tokens to recompute.  None: an ordinary prompt.
    segment_lens: Optional[tuple[int, ...]] = None
    blend_ratio: float = 0.15
    # The blend a KV source planned for this request's next step (kvserve.blend.spec.BlendStep),
    # taken by the scheduler into the step; plain data.
    pending_blend: Optional[object] = None
    # P/D disaggregation (kvserve/disagg/): the `kv_transfer_params` the request came with
    # (plain JSON), and those it answers with once exported (a prefill instance's answer).
    kv_transfer_params: Optional[dict[str, Any]] = None
    kv_transfer_out: Optional[dict[str, Any]] = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Chained hashes of every full block of all_token_ids, appended as blocks fill.
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_tokens: int = -1  # prompt tokens served from cache at first schedule
    num_preemptions: int = 0
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    stop_reason: Optional[str | int] = None
    # Per generated token: {token_id: logprob} of the top-k (plus the sampled one).
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    # Per prompt position (None for the first): {token_id: logprob}.
    prompt_logprobs: list[Optional[dict[int, float]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self._extend_block_hashes()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self._extend_block_hashes()

    def _extend_block_hashes(self) -> None:
        bs = self.block_size
        # With segments, KV after the first segment may be blended (approximate): those
        # blocks get hashes of their own, so an ordinary prompt never reads them.
        exact = self.segment_lens[0] if self.segment_lens else None
        while (len(self.block_hashes) + 1) * bs <= len(self.all_token_ids):
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else None
            extra = self.hash_extra_keys
            if exact is not None and (i + 1) * bs > exact:
                extra = extra + b"blend:%r" % self.blend_ratio
            self.block_hashes.append(hash_block(parent, self.all_token_ids[i * bs:(i + 1) * bs], extra))
