"""Roofline numbers checked by hand."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvserve.bench import roofline as rl
from kvserve.bench.errors import BenchInputError
from kvserve.bench.offline import REFERENCE_CONFIG

H100 = rl.HW_PRESETS["h100"]


@pytest.fixture(scope="module")
def llama(shared_data: Path) -> rl.ModelSpec:
    return rl.load_model_spec(shared_data / "configs/llama-3.1-8b.json")


def test_llama_kv_bytes_and_params(llama: rl.ModelSpec) -> None:
    assert llama.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2 == 131072
    assert llama.kv_bytes_per_token(1) == 65536
    emb = 128256 * 4096
    layer = (4096 * 4096 * 2 + 2 * 4096 * 1024) + 3 * 4096 * 14336
    assert llama.total_params == 32 * layer + 2 * emb == 8_029_995_008
    # Meta's 8,030,261,248 includes the RMSNorm weights (32*2*4096 + 4096), which we ignore
    assert 8_030_261_248 - llama.total_params == 32 * 2 * 4096 + 4096
    assert llama.active_params == 32 * layer + emb  # input embedding is a lookup, LM head a matmul


def test_llama_decode_step_by_hand(llama: rl.ModelSpec) -> None:
    b = rl.decode_step_bound(llama, H100, batch=1, context=4095, w_bytes=2)
    weights = 7_504_658_432 * 2
    kv = 4096 * 131072  # 4095 cached + the new token
    assert b.bytes == weights + kv
    assert b.memory_s == pytest.approx((weights + kv) / 3.35e12)
    assert b.time_s == pytest.approx(4.6406e-3, rel=1e-4) and b.bound_by == "memory"
    per_pair = 32 * 2 * 32 * (128 + 128)
    assert b.flops == 2 * 7_504_658_432 + per_pair * 4096


def test_llama_prefill_by_hand(llama: rl.ModelSpec) -> None:
    b = rl.prefill_bound(llama, H100, 4096, w_bytes=2)
    head = 128256 * 4096  # the LM head runs for the last position only
    flops = 2 * (7_504_658_432 - head) * 4096 + 2 * head + 32 * 2 * 32 * 256 * (4096 * 4097 / 2)
    assert b.flops == pytest.approx(flops)
    assert b.time_s == pytest.approx(flops / 989e12) and b.bound_by == "compute"


def test_llama_capacity_and_swap(llama: rl.ModelSpec) -> None:
    free = 80e9 - 8_029_995_008 * 2
    assert rl.max_concurrent_requests(llama, H100, 8192, 2) == int(free // (8192 * 131072)) == 59
    assert rl.swap_time_s(llama, 4096, rl.LINK_PRESETS["pcie4"], 2) == pytest.approx(4096 * 131072 / 32e9)
    weights_too_big = rl.HardwareSpec("tiny", 1e12, 1e12, 10e9)
    assert rl.max_concurrent_requests(llama, weights_too_big, 10, 2) == 0


def test_moe_active_params(shared_data: Path) -> None:
    mixtral = rl.load_model_spec(shared_data / "configs/mixtral-8x7b-v0.1.json")
    assert mixtral.total_params / 1e9 == pytest.approx(46.70, abs=0.01)  # "46.7B"
    assert (mixtral.active_params + mixtral.embedding_params) / 1e9 == pytest.approx(12.88, abs=0.01)  # "12.9B"
    qwen = rl.load_model_spec(shared_data / "configs/qwen3-30b-a3b.json")
    assert qwen.total_params / 1e9 == pytest.approx(30.53, abs=0.01)
    assert (qwen.active_params + qwen.embedding_params) / 1e9 == pytest.approx(3.35, abs=0.01)  # "A3B": 3.3B
    # One token reads the active experts only; a huge batch touches every expert.
    assert qwen.weight_params_read(1) == pytest.approx(qwen.active_params)
    body_all = qwen.total_params - qwen.embedding_params
    assert qwen.weight_params_read(100_000) == pytest.approx(body_all, rel=1e-6)


def test_mla_deepseek(shared_data: Path) -> None:
    ds = rl.load_model_spec(shared_data / "configs/deepseek-v2-lite.json")
    assert ds.is_mla
    assert ds.kv_bytes_per_token(2) == 27 * (512 + 64) * 2 == 31104
    assert ds.total_params / 1e9 == pytest.approx(15.7, abs=0.05)  # "15.7B total"
    attn = 2048 * 16 * 192 + 2048 * (512 + 64) + 512 * 16 * (128 + 128) + 16 * 128 * 2048  # q, kv_a, kv_b, o
    expert = 3 * 2048 * 1408
    moe_layer = attn + (6 + 2) * expert + 2048 * 64  # 6 routed + 2 shared experts + router
    dense_layer = attn + 3 * 2048 * 10944
    assert ds.active_params == 26 * moe_layer + dense_layer + 102400 * 2048 == 2_451_308_544  # "2.4B active"
    assert ds.moe_layers == 26  # first_k_dense_replace = 1
    assert ds.d_qk == 192 and ds.d_v == 128


def test_workload_bound_by_hand() -> None:
    cfg = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 4, "intermediate_size": 16, "vocab_size": 10, "tie_word_embeddings": False}
    m = rl.model_spec_from_config(cfg)
    assert (m.total_params, m.active_params) == (736, 656)  # attn 192, mlp 384, emb 80, head 80
    assert m.kv_bytes_per_token(2) == 16 and m.attn_flops_per_pair() == 32
    hw = rl.HardwareSpec("toy", 1000.0, 100.0, 1e9)
    b = rl.workload_bound(m, hw, [(10, 3), (5, 1)], w_bytes=2)
    # flops: request 1 processes 12 tokens (78 causal pairs) with the 80-weight LM head on its 3 sampled
    # positions; request 2 processes 5 (15 pairs) and samples once
    assert b.flops == 2 * 576 * 12 + 2 * 80 * 3 + 32 * 78 + 2 * 576 * 5 + 2 * 80 * 1 + 32 * 15 == 23200
    # bytes: 3 sequential passes x 1312 weight bytes; KV reads (10 + 11) tokens, writes 12 + 5 tokens
    assert b.bytes == 3 * 1312 + (21 + 17) * 16 == 4544
    assert b.time_s == pytest.approx(45.44) and b.bound_by == "memory"


def test_reference_model_params() -> None:
    spec = rl.model_spec_from_config(REFERENCE_CONFIG)
    # SmolLM2-135M has 134,515,008 parameters including 30*2*576 + 576 norm weights
    assert spec.total_params == 134_515_008 - (30 * 2 * 576 + 576)


def test_all_shared_configs_load(shared_data: Path) -> None:
    for path in sorted((shared_data / "configs").glob("*.json")):
        m = rl.load_model_spec(path)
        assert m.total_params >= m.active_params - m.lm_head_params > 0
        assert m.kv_bytes_per_token(2) > 0


def test_hardware_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert rl.resolve_hardware("H200").mem_bandwidth == 4.8e12
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"matmul_flops": 1.4e11, "mem_bandwidth": 2e10, "mem_bytes": 3e10}))
    assert rl.resolve_hardware(str(probe)).peak_flops == 1.4e11
    monkeypatch.setenv("KVSERVE_HW_PROBE", str(probe))  # cpu-local reads the cached probe
    assert rl.resolve_hardware("cpu-local").mem_bandwidth == 2e10
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(BenchInputError, match="bad.json"):
        rl.resolve_hardware(str(bad))
    with pytest.raises(BenchInputError):
        rl.resolve_hardware("tpu")
    assert rl.resolve_link("nvlink") == 450e9 and rl.resolve_link("25") == 25e9
    with pytest.raises(BenchInputError):
        rl.resolve_link("carrier-pigeon")
