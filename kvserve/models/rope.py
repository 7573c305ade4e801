"""Rotary position embeddings, with the `llama3` and `linear` scaling rules.

The inverse frequencies are computed in float32 exactly as HF transformers
does, so cos/sin tables agree bit for bit.  Keys are stored in the KV cache
*after* rotation.  RoPE rotations compose additively (R(p + d) = R(d) R(p),
every scaling rule here included: they only change the frequencies), so a
cached key can be moved from one position to another by rotating it by the
difference: `rerotate_keys` (for non-prefix reuse, where a cached chunk is
placed at a position other than the one it was computed at).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch


def inv_freq_default(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def inv_freq_llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling (wavelength bands)."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`; short ones kept; the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(head_dim: int, theta: float, scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    inv_freq = inv_freq_default(head_dim, theta)
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return inv_freq_llama3(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling type {rope_type!r}")


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        inv_freq = compute_inv_freq(head_dim, theta, scaling)
        pos = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # [max_positions, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim / 2] float32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `positions` [T] as [T, 1, head_dim] in `dtype`."""
        return (self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1))

    def rerotate(self, k: torch.Tensor, from_positions: torch.Tensor, to_positions: torch.Tensor) -> torch.Tensor:
        """Cached keys computed at `from_positions` as if computed at `to_positions` (see rerotate_keys)."""
        return rerotate_keys(k, to_positions - from_positions, self.inv_freq)  # type: ignore[arg-type]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, 1, head_dim]."""
    return x * cos + rotate_half(x) * sin


def rerotate_keys(k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys rotated at position p -> the same keys rotated at p + delta.

    k: [T, heads, head_dim] (rotated, as stored in the KV cache); delta: [T] integer
    position differences (any sign; positions beyond the cos/sin tables are fine:
    the angles are computed here, in float32); inv_freq: [head_dim / 2].
    """
    angles = delta.to(torch.float32)[:, None] * inv_freq.to(delta.device)[None, :]  # [T, head_dim / 2]
    emb = torch.cat((angles, angles), dim=-1)
    cos = emb.cos().to(k.dtype).unsqueeze(1)  # [T, 1, head_dim]
    sin = emb.sin().to(k.dtype).unsqueeze(1)
    return apply_rope(k, cos, sin)
