"""The torch dequantizers (kvserve/models/gguf/dequant.py) against gguf.quants, llama.cpp's reference."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from kvserve.models.gguf.dequant import BLOCK_KERNELS, dequantize, reference_dequantize, supported_types
from kvserve.models.gguf.reader import GGUFTensorInfo
from tests.unit.models.tiny_gguf import ALL_TYPES, encode

# Worst relative error of the test's own quantizers (tiny_gguf.encode) on N(0, 1) data: a check
# that the blocks they build decode to the weights they came from.
MAX_REL_ERROR = {"F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q4_0": 0.15, "Q4_1": 0.1,
                 "Q5_0": 0.07, "Q5_1": 0.05, "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.05}


def _info(data: np.ndarray, qtype: str, shape: tuple[int, ...], name: str = "w") -> GGUFTensorInfo:
    return GGUFTensorInfo(name, qtype, shape, data, int(gguf.GGMLQuantizationType[qtype]))


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_dequantize_equals_the_gguf_reference(qtype):
    x = np.random.default_rng(1).standard_normal((6, 512)).astype(np.float32)
    data, _ = encode(x, qtype)
    info = _info(data, qtype, x.shape)
    ours = dequantize(info)
    assert ours.shape == x.shape
    if qtype in ("F32", "F16"):  # stored as numpy floats: the reference is the array itself
        ref = torch.from_numpy(np.asarray(data, dtype=np.float32))
    else:
        ref = reference_dequantize(info)
    assert torch.equal(ours.float(), ref), f"{qtype}: max diff {(ours.float() - ref).abs().max()}"
    rel = float((ours.float() - torch.from_numpy(x)).abs().max() / np.abs(x).max())
    assert rel <= MAX_REL_ERROR[qtype], f"{qtype}: the test's blocks decode {rel:.3f} away from the weights"


@pytest.mark.parametrize("qtype", sorted(BLOCK_KERNELS))
def test_random_blocks_equal_the_reference(qtype):
    """Every bit pattern of the quant bytes, not just what a quantizer writes; the float16 scale
    fields are set to finite values (random bytes would include NaN, which never compares equal)."""
    block_size, type_size, _ = BLOCK_KERNELS[qtype]
    rng = np.random.default_rng(2)
    rows, blocks_per_row = 5, 2
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    halves = {"Q6_K": [208]}.get(qtype, [0, 2] if qtype in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0])
    for off in halves:
        raw[:, off:off + 2] = rng.uniform(-2, 2, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    info = _info(raw.reshape(rows, -1), qtype, (rows, blocks_per_row * block_size))
    assert torch.equal(dequantize(info), reference_dequantize(info))


def test_large_tensors_are_dequantized_in_chunks_with_the_same_result(monkeypatch):
    from kvserve.models.gguf import dequant

    x = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    data, _ = encode(x, "Q4_K")
    info = _info(data, "Q4_K", x.shape)
    whole = dequantize(info)
    monkeypatch.setattr(dequant, "_CHUNK_BLOCKS", 7)  # 64 blocks in 10 uneven chunks
    assert torch.equal(dequantize(info), whole)


def test_float_types_keep_their_dtype():
    x = np.random.default_rng(4).standard_normal((3, 8)).astype(np.float32)
    assert dequantize(_info(x, "F32", x.shape)).dtype == torch.float32
    assert dequantize(_info(x.astype(np.float16), "F16", x.shape)).dtype == torch.float16
    data, _ = encode(x, "BF16")
    t = dequantize(_info(data, "BF16", x.shape))
    assert t.dtype == torch.bfloat16 and torch.equal(t, torch.from_numpy(x).to(torch.bfloat16))


def test_a_type_without_a_kernel_falls_back_to_the_reference_and_an_unknown_type_is_named():
    assert {"Q2_K", "Q3_K"} <= set(supported_types()) and "Q2_K" not in BLOCK_KERNELS
    raw = np.zeros((2, 84), dtype=np.uint8)  # two all-zero Q2_K blocks decode to zeros
    assert torch.equal(dequantize(_info(raw, "Q2_K", (2, 256))), torch.zeros(2, 256))
    with pytest.raises(ValueError, match=r"tensor 'blk\.3\.ffn_up\.weight' has GGML type Q8_1"):
        dequantize(_info(np.zeros((1, 36), dtype=np.uint8), "Q8_1", (1, 32), name="blk.3.ffn_up.weight"))


def test_row_length_must_fit_the_block():
    with pytest.raises(ValueError, match="not a multiple of the block size 256"):
        dequantize(_info(np.zeros((1, 144), dtype=np.uint8), "Q4_K", (1, 128)))
