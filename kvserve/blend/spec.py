"""Plain data for blending: the segments of a prompt and one step's blend (no torch).

A prompt given as segments [s0, s1, ..., s_last] is their concatenation.  s0 goes
through the ordinary prefix cache (a system prompt or instruction: always at
position 0); s1 .. s_{last-1} are document chunks, cached under a hash of their
tokens alone and reusable at any position; s_last (the question) is always
computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

# Most segments one prompt may have (a bound on per-request bookkeeping).
MAX_SEGMENTS = 64


def validate_segments(segment_lens: Sequence[int], max_model_len: int) -> None:
    """Raise ValueError (a clear message, answered 400 by the server) for bad segments."""
    if len(segment_lens) < 2:
        raise ValueError("segments needs at least 2 segments (a prefix and a question; documents between)")
    if len(segment_lens) > MAX_SEGMENTS:
        raise ValueError(f"segments has {len(segment_lens)} segments; at most {MAX_SEGMENTS} are allowed")
    for i, n in enumerate(segment_lens):
        if n == 0:
            raise ValueError(f"segment {i} is empty; every segment needs at least one token")
        if n >= max_model_len:
            raise ValueError(f"segment {i} has {n} tokens, more than the context allows "
                             f"(max_model_len={max_model_len})")


def check_blend_request(segment_lens: Sequence[int], num_prompt_tokens: int, n: int, ratio: float,
                        max_model_len: int) -> None:
    """Everything a request with segments must satisfy (ValueError otherwise)."""
    validate_segments(segment_lens, max_model_len)
    if sum(segment_lens) != num_prompt_tokens:
        raise ValueError(f"segment lengths add up to {sum(segment_lens)}, not the prompt's {num_prompt_tokens} tokens")
    if n != 1:
        raise ValueError("segments with n > 1 are not supported yet")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"blend_recompute_ratio must be in [0, 1], got {ratio}")


def num_selected(ratio: float, num_chunk_tokens: int) -> int:
    """How many of a blend's chunk tokens are recomputed at `ratio` (ceil, so any ratio > 0
    recomputes at least one token; 1.0 recomputes all)."""
    return min(num_chunk_tokens, math.ceil(ratio * num_chunk_tokens - 1e-9))


def segment_starts(segment_lens: Sequence[int]) -> list[int]:
    """Position of each segment's first token in the concatenated prompt."""
    starts, pos = [], 0
    for n in segment_lens:
        starts.append(pos)
        pos += n
    return starts


@dataclass(slots=True)
class ChunkPlacement:
    """One document chunk of a blend.  Its KV was computed after `sink` alone (the prompt's
    first segment, or its first `sink_tokens`: what every prompt of the application starts with):
    the chunk blocks
    `src_block_ids` hold sink + chunk at positions 0 .. len(sink) + length - 1, and the
    chunk's part goes to prompt positions dst_start .. dst_start + length - 1."""

    dst_start: int
    length: int
    src_block_ids: list[int]
    # True: the chunk was not cached; the runner computes sink + chunk into src_block_ids
    # first, and the chunk source registers them afterwards.
    compute: bool
    token_ids: list[int] = field(default_factory=list)  # the chunk's tokens (for compute)
    sink: list[int] = field(default_factory=list)


@dataclass(slots=True)
class BlendStep:
    """What the runner does for a request whose step runs the rest of its prompt:
    place `chunks` (keys re-rotated), recompute `ratio` of their tokens (the ones whose
    KV deviates most at layer `check_layer`) plus every token outside a chunk."""

    chunks: list[ChunkPlacement]
    ratio: float
    check_layer: int = 1
    emitted: bool = False  # set by the scheduler when the step carries it

    @property
    def reused_tokens(self) -> int:
        return sum(c.length for c in self.chunks)
