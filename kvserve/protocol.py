"""The types one engine step passes between components.

    Scheduler --SchedulerOutput--> executor (model runner, or a cost model) --ModelRunnerOutput--> Scheduler

Step inputs and outputs are plain data (ints, lists, strings, SamplingParams):
no tensors and no live objects, so a step can cross a process boundary and a
simulator can stand in for the model.  This module imports neither torch nor
the core, so both sides (core/ and worker/) depend on it and not on each other.

The forward-context types at the end are the other contract: the one the model
files have with the attention backends.  They hold tensors, live only inside
the executor and never cross a process boundary; torch is imported for type
checking only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol, Sequence

from kvserve.hashing import BlockHash
from kvserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from kvserve.blend.spec import BlendStep
    from kvserve.worker.attention.base import AttentionBackend


# ----------------------------------------------------------------- KV transfers
@dataclass(frozen=True, slots=True)
class KVSave:
    """Copy device block `block_id` (content of `block_hash`) out to the tiers."""

    block_hash: BlockHash
    block_id: int


@dataclass(frozen=True, slots=True)
class KVLoad:
    """Copy loaded host blocks [first, first + len(block_ids)) of `request_id` into these device blocks."""

    request_id: str
    first: int
    block_ids: list[int]


@dataclass(frozen=True, slots=True)
class KVFetch:
    """Start loading blocks `block_hashes` of `request_id` from the tiers into host memory, in
    the background; the executor reports the load finished in a later step's output
    (ModelRunnerOutput.kv_transfers_done), and a KVLoad then copies it into device blocks."""

    request_id: str
    block_hashes: list[BlockHash]


@dataclass(slots=True)
class KVTransferEvents:
    """Tier work the executor saw finish since its previous step (plain data)."""

    loads: dict[str, int] = field(default_factory=dict)  # request id -> leading blocks loaded
    saved: list[BlockHash] = field(default_factory=list)
    dropped: list[BlockHash] = field(default_factory=list)  # saves refused (back-pressure)

    def __bool__(self) -> bool:
        return bool(self.loads or self.saved or self.dropped)


@dataclass(frozen=True, slots=True)
class BlockCopy:
    """Preemption by swap: copy device blocks `block_ids[i]` <-> host swap slots `host_slots[i]`
    (kvserve/core/swap.py decides, the executor's host swap space copies)."""

    block_ids: list[int]
    host_slots: list[int]


# ------------------------------------------------------------------- step input
@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step (plain data for the executor)."""

    request_id: str
    token_ids: list[int]  # the tokens whose K/V are computed this step
    # The position of each of token_ids: range(num_computed_tokens, +len(token_ids))
    # for prefill chunks and decodes (a `range`, so building it costs nothing); later
    # k+1 positions for speculative verification, a chosen subset for blending.
    positions: Sequence[int]
    start_pos: int  # positions[0] == num_computed_tokens before the step
    # Block-table diff: the blocks appended to the request's table since the last step
    # it was in (usually none for a decode), or the whole table when `full_table`
    # (the request's first step, or its first after a preemption).  The executor keeps
    # the tables (kvserve/worker/input_batch.py); finished/preempted ids release them.
    block_ids: list[int]
    sample: bool  # this chunk reaches the end of the sequence: sample a token
    sampling_params: SamplingParams
    # Token history for penalties; shared references, read-only for the runner.
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator_key: tuple[str, int]  # (request id, sample index): per-request RNG identity
    prompt_logprobs: bool  # compute logprobs for the prompt positions in this chunk
    full_table: bool = True  # block_ids is the whole table (see block_ids)
    # Speculative decoding: the last num_draft_tokens of token_ids are proposed drafts to
    # verify (token_ids = [last committed token, d_1..d_k], positions k+1 contiguous); the
    # executor reports 1 + accepted drafts in ModelRunnerOutput.num_accepted.
    num_draft_tokens: int = 0
    # CacheBlend (kvserve/blend/): cached document chunks to place at their positions and
    # the tokens to recompute; set only on a step that runs the rest of the prompt at once.
    blend: Optional["BlendStep"] = None


@dataclass
class SchedulerOutput:
    requests: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted_ids: list[str] = field(default_factory=list)  # lost their blocks in this schedule
    finished_ids: list[str] = field(default_factory=list)  # freed since last step
    # Offload tiers: the runner first copies kv_saves out of the device pool
    # (their blocks may be reused by this very step), then kv_loads in, then
    # runs the forward.
    kv_saves: list[KVSave] = field(default_factory=list)
    kv_loads: list[KVLoad] = field(default_factory=list)
    # Preemption by swap, applied after kv_saves and before kv_loads: swap-outs first
    # (their device blocks may be this step's swap-in or forward targets), then swap-ins.
    swap_outs: list[BlockCopy] = field(default_factory=list)
    swap_ins: list[BlockCopy] = field(default_factory=list)
    # Background tier loads, applied first (they touch no device memory): drop the loads of
    # kv_cancels (in flight or loaded, their host copies freed), then start kv_fetches.
    kv_cancels: list[str] = field(default_factory=list)
    kv_fetches: list[KVFetch] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    @property
    def has_bookkeeping(self) -> bool:
        """What a step without requests may carry that the executor must still apply
        (ids to release, copies out, tier loads to start or drop)."""
        return bool(self.finished_ids or self.kv_saves or self.swap_outs or self.kv_cancels or self.kv_fetches)


# ------------------------------------------------------------------ step output
@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprobs: Optional[dict[int, float]] = None  # top-k + the sampled token


@dataclass
class ModelRunnerOutput:
    # request_id -> tokens sampled this step (one per request; with drafts, the accepted
    # drafts then the bonus/correction token).
    sampled: dict[str, list[SampledToken]] = field(default_factory=dict)
    # request_id -> logprob dicts for the prompt positions computed this step.
    prompt_logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)
    # request_id -> how many of its scheduled positions, from the first, hold valid KV
    # after the step (the scheduler commits num_computed_tokens from this).  Sparse: a
    # request not listed had all of them accepted, which is every request of a step
    # without speculation; a verifier lists the ones whose drafts it rejected.
    num_accepted: dict[str, int] = field(default_factory=dict)
    # Tier loads finished (completed or truncated by a miss) and saves written or dropped
    # since the executor's previous step; the scheduler's KV sources fold them in.
    kv_transfers_done: KVTransferEvents = field(default_factory=KVTransferEvents)


class Executor(Protocol):
    """Runs steps: the model runner (kvserve.worker.model_runner), or anything with its
    interface, e.g. a cost model in a simulator.  A step with no requests still carries
    bookkeeping (finished ids, KV saves, tier fetches) the executor must apply, and its
    output (finished tier loads) must reach the scheduler like any other."""

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput: ...


# ------------------------------------------------- forward context (executor only)
@dataclass
class PrefillSeq:
    q_start: int  # offset of the chunk in the flattened batch
    q_len: int
    start_pos: int  # tokens already in the cache before this chunk
    block_ids: "torch.Tensor"  # [num_blocks] long, covering start_pos + q_len tokens

    @property
    def ctx_len(self) -> int:
        return self.start_pos + self.q_len


@dataclass
class AttentionMetadata:
    slot_mapping: "torch.Tensor"  # [T] long: cache slot (block_id * block_size + offset) of each new token
    num_decode_tokens: int  # the first D tokens are single-token queries
    decode_block_tables: Optional["torch.Tensor"]  # [D, max_blocks] long, padded with block 0
    decode_seq_lens: Optional["torch.Tensor"]  # [D] long: context length including the new token
    decode_mask: Optional["torch.Tensor"]  # [D, 1, 1, max_blocks * block_size] bool, True = attend
    prefills: list[PrefillSeq] = field(default_factory=list)
    block_size: int = 16


@dataclass
class ForwardContext:
    """Everything a model's attention layers need for one step, passed down the forward call."""

    backend: "AttentionBackend"
    kv_caches: list["torch.Tensor"]  # per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata
