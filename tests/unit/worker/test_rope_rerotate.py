"""RoPE re-rotation: a key cached at one position moved to another equals the key
rotated at the new position directly (every scaling rule)."""
from __future__ import annotations

import pytest
import torch

from kvserve.models.rope import RotaryEmbedding, apply_rope, rerotate_keys

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
}


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rerotated_keys_equal_keys_rotated_at_the_new_position(scaling):
    g = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(64, 4096, 500000.0, SCALINGS[scaling])
    k = torch.randn(32, 4, 64, generator=g)  # [T, heads, head_dim], not yet rotated
    src = torch.randint(0, 2048, (32,), generator=g)
    dst = torch.randint(0, 4096, (32,), generator=g)  # later or earlier than src
    cached = apply_rope(k, *rope.cos_sin(src, torch.float32))
    moved = rope.rerotate(cached, src, dst)
    direct = apply_rope(k, *rope.cos_sin(dst, torch.float32))
    # float32 angles at positions ~4k carry ~2.5e-4 rad of rounding (as the cos/sin tables do)
    torch.testing.assert_close(moved, direct, atol=1e-3, rtol=1e-3)
    # Moving back restores the cached keys; a zero move changes nothing.
    torch.testing.assert_close(rope.rerotate(moved, dst, src), cached, atol=1e-3, rtol=1e-3)
    assert torch.equal(rerotate_keys(cached, torch.zeros(32, dtype=torch.long), rope.inv_freq), cached)
    # And it really rotates: a different key unless the move is zero.
    assert not torch.allclose(moved[src != dst], cached[src != dst], atol=1e-2)


def test_rerotation_beyond_the_tables_and_in_bfloat16():
    rope = RotaryEmbedding(16, 128, 10000.0)
    k = torch.randn(3, 2, 16)
    far = torch.tensor([10_000, 20_000, 40_000])  # outside the 128-position cos/sin tables
    moved = rerotate_keys(k, far, rope.inv_freq)
    back = rerotate_keys(moved, -far, rope.inv_freq)
    torch.testing.assert_close(back, k, atol=1e-3, rtol=1e-3)
    kb = k.to(torch.bfloat16)
    assert rerotate_keys(kb, far, rope.inv_freq).dtype == torch.bfloat16
