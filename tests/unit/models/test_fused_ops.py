"""The fused CPU layer ops (csrc/cpu_model_ops.cpp, switched on by kvserve.models.fused_ops)
equal their torch references, op by op and through a whole engine (KVSERVE_CPU_FUSED=1 vs 0)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvserve.models import cpu_kernels, fused_ops, layers
from kvserve.models.rope import RotaryEmbedding, apply_rope

ext = cpu_kernels.load()
pytestmark = pytest.mark.skipif(ext is None, reason="the CPU model kernels cannot be built here")


@pytest.mark.parametrize("rows", [1, 3, 300])
@pytest.mark.parametrize("width", [64, 576, 13])
def test_rms_norm_and_add_rms_norm(rows: int, width: int) -> None:
    g = torch.Generator().manual_seed(rows + width)
    norm = layers.RMSNorm(width, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=g))
        x, r = torch.randn(rows, width, generator=g) * 3, torch.randn(rows, width, generator=g)
        ref, ref_h = norm(x), r + x  # ext not set: the torch code
        fused_ops.enable(norm, ext)
        torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-5)
        h, normed = norm.add_forward(x, r)
        assert torch.equal(h, ref_h)  # the add is exact
        torch.testing.assert_close(normed, norm.reference(ref_h), rtol=1e-5, atol=1e-5)
        x3 = x.view(rows, 1, width)  # not 2-D: the torch code, same result
        torch.testing.assert_close(norm(x3), ref.view(rows, 1, width), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 700])
def test_rope_inplace_equals_apply_rope(rows: int) -> None:
    H, KVH, D = 9, 3, 64
    rope = RotaryEmbedding(D, 2048, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    g = torch.Generator().manual_seed(rows)
    pos = torch.randint(0, 2048, (rows,), generator=g)
    cos, sin = rope.cos_sin(pos, torch.float32)
    qkv = torch.randn(rows, (H + 2 * KVH) * D, generator=g)
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    ref_q = apply_rope(q.reshape(rows, H, D), cos, sin)
    ref_k = apply_rope(k.reshape(rows, KVH, D), cos, sin)
    ref_v = v.clone()
    ext.rope_inplace(qkv, cos.view(rows, D), sin.view(rows, D), H + KVH, D)
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    torch.testing.assert_close(q.reshape(rows, H, D), ref_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k.reshape(rows, KVH, D), ref_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(v, ref_v)  # v heads untouched


@pytest.mark.parametrize("rows", [1, 4, 200])
@pytest.mark.parametrize("inter", [96, 21])  # 21: the scalar tail after the 8-wide loop
def test_silu_and_mul(rows: int, inter: int) -> None:
    g = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * inter, generator=g) * 8  # large |gate| too: the exp's clamps
    gate_up[0, 0], gate_up[0, 1], gate_up[0, inter - 1] = 120.0, -120.0, -95.0
    torch.testing.assert_close(ext.silu_and_mul(gate_up), layers.silu_and_mul(gate_up, inter), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(RuntimeError, match="residual differ"):
        ext.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="exceed width"):
        ext.rope_inplace(torch.randn(2, 64), torch.randn(2, 32), torch.randn(2, 32), 3, 32)
    with pytest.raises(RuntimeError, match="float32"):
        ext.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8), 1e-6)


def test_extension_for_respects_device_dtype_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert fused_ops.extension_for(cpu, torch.float32) is ext
    assert fused_ops.extension_for(cpu, torch.bfloat16) is None
    monkeypatch.setenv(fused_ops.ENV, "0")
    assert fused_ops.extension_for(cpu, torch.float32) is None


@pytest.mark.parametrize("name", ["llama-tied", "qwen2", "qwen3"])  # qwen3: q/k norms keep torch's rotary
def test_engine_fused_equals_reference(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvserve import LLM, SamplingParams
    from tests.helpers.tiny_models import build_tiny_model

    d = build_tiny_model(name, tmp_path / name, seed=11)
    prompts = [{"prompt_token_ids": [3, 17, 99, 4, 250, 7, 1, 2, 3]}, {"prompt_token_ids": [8, 8, 1]}]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(fused_ops.ENV, flag)
        with LLM(str(d), num_kv_blocks=32, block_size=8) as llm:
            model = llm.engine.core.model
            assert (model.layers[0].mlp.ext is not None) == (flag == "1")
            outs[flag] = llm.generate(prompts, params, use_tqdm=False)
    for ref, fast in zip(outs["0"], outs["1"]):
        assert fast.outputs[0].token_ids == ref.outputs[0].token_ids
        for lr, lf in zip(ref.outputs[0].logprobs, fast.outputs[0].logprobs):
            tok = next(iter(lr))
            assert abs(lr[tok].logprob - lf[tok].logprob) < 1e-4
