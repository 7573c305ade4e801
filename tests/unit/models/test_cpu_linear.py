"""kvserve.models.cpu_linear: packed weights (kvserve's blocked kernel, oneDNN: the fast paths)
equal F.linear (the reference path) up to float rounding, layer by layer and for whole loaded
models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvserve.models import cpu_gemm, cpu_linear, cpu_linear_rows
from kvserve.models.layers import Linear, MergedLinear
from kvserve.models.loader import load_model
from tests.helpers.tiny_models import build_tiny_model

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
FAST_MODES = ["blocked", "onednn"]


@pytest.fixture(params=FAST_MODES)
def fast_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(cpu_linear.ENV, request.param)
    return str(request.param)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features", [200, 208])  # 208 = 13 blocks of 16; 200 is oneDNN's in both modes
def test_packed_linear_equals_f_linear(rows: int, bias: bool, out_features: int, fast_mode: str) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g)
    w = torch.randn(out_features, 96, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    packed = cpu_linear.pack(w)
    blocked = fast_mode == "blocked" and out_features % 16 == 0 and cpu_gemm.load() is not None
    assert packed.dim() == (3 if blocked else 2)  # the path taken is the one asked for
    y = cpu_linear.linear(x, None, b, packed=packed)
    ref = F.linear(x, w, b)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_leading_dims_empty_and_strided_input(fast_mode: str) -> None:
    w = torch.randn(48, 32)
    p = cpu_linear.pack(w)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(cpu_linear.linear(x, None, packed=p), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert cpu_linear.linear(torch.randn(0, 32), None, packed=p).shape == (0, 48)
    xt = torch.randn(32, 6).t()  # not contiguous
    torch.testing.assert_close(cpu_linear.linear(xt, None, packed=p), F.linear(xt, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_pack_linears_replaces_weights_and_keeps_outputs(fast_mode: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear(16, 24, bias=True), MergedLinear(24, [8, 8], bias=False))
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = model(x)
        assert cpu_linear.pack_linears(model) == 2
        fast = model(x)
    assert all(m.weight.numel() == 0 and m.packed_weight is not None for m in model)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_blocked_weights_share_one_arena(monkeypatch: pytest.MonkeyPatch) -> None:
    """pack_linears lays every blocked weight into one buffer (huge pages), each on a 64-byte line,
    without overlap; a weight the blocked kernel cannot take still gets its own oneDNN packing."""
    if cpu_gemm.load() is None or not torch.backends.mkldnn.is_available():
        pytest.skip("no C++ compiler or no oneDNN")
    monkeypatch.setenv(cpu_linear.ENV, "blocked")
    torch.manual_seed(1)
    model = torch.nn.Sequential(Linear(40, 32, bias=False), Linear(32, 20, bias=True), MergedLinear(20, [16, 32], bias=False))
    x = torch.randn(3, 40)
    with torch.no_grad():
        ref = model(x)
        cpu_linear.pack_linears(model)
        fast = model(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    blocked = [model[0].packed_weight, model[2].packed_weight]
    assert all(p is not None and p.dim() == 3 for p in blocked) and model[1].packed_weight.dim() == 2  # 20 rows: oneDNN
    assert blocked[0].untyped_storage().data_ptr() == blocked[1].untyped_storage().data_ptr()
    start0, start1 = blocked[0].data_ptr(), blocked[1].data_ptr()
    assert start0 % 64 == 0 and start1 % 64 == 0 and start1 >= start0 + blocked[0].numel() * 4


def test_packing_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setenv(cpu_linear.ENV, "reference")
    assert not cpu_linear.packing_enabled(cpu, torch.float32)
    for mode in FAST_MODES:
        monkeypatch.setenv(cpu_linear.ENV, mode)
        assert cpu_linear.packing_enabled(cpu, torch.float32) == torch.backends.mkldnn.is_available()
    assert not cpu_linear.packing_enabled(cpu, torch.bfloat16)  # float32 only: what was measured
    monkeypatch.setenv(cpu_linear.ENV, "fast")
    with pytest.raises(ValueError, match="KVSERVE_CPU_LINEAR"):
        cpu_linear.packing_enabled(cpu, torch.float32)


@needs_onednn
@pytest.mark.parametrize("name", ["llama-tied", "qwen2"])  # tied head (packed copy) / qkv bias
def test_loaded_model_packed_equals_reference(name: str, tmp_path: Path, fast_mode: str) -> None:
    d = build_tiny_model(name, tmp_path / name, seed=3)
    ref_model, _ = load_model(d, torch.float32, "cpu", max_positions=64)  # the loader keeps plain weights
    fast_model, _ = load_model(d, torch.float32, "cpu", max_positions=64)
    cpu_linear.pack_linears(fast_model)  # what EngineCore.from_config does on CPU in float32
    assert fast_model.lm_head_packed is not None and ref_model.lm_head_packed is None
    h = torch.randn(7, ref_model.cfg.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(fast_model.compute_logits(h), ref_model.compute_logits(h), rtol=1e-5, atol=1e-4)
        layer_f, layer_r = fast_model.layers[0].mlp, ref_model.layers[0].mlp
        torch.testing.assert_close(layer_f(h), layer_r(h), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_engine_packs_on_cpu_float32_unless_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvserve import LLM, SamplingParams

    d = build_tiny_model("llama-tied", tmp_path / "m", seed=5)
    prompts = [{"prompt_token_ids": [3, 17, 99, 4, 250, 7]}, {"prompt_token_ids": [8, 8, 1]}]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for mode in ("reference", *FAST_MODES):
        monkeypatch.setenv(cpu_linear.ENV, mode)
        with LLM(str(d), num_kv_blocks=32, block_size=8) as llm:
            model = llm.engine.core.model
            assert (model.lm_head_packed is not None) == (mode != "reference")
            if mode == "blocked" and cpu_gemm.load() is not None:  # the tiny model's shapes are all blocked
                assert model.lm_head_packed is not None and model.lm_head_packed.dim() == 3
            outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["blocked"] == outs["reference"]
    assert outs["onednn"] == outs["reference"]


# ----------------------------------------------------------------------------- MKL at prefill sizes


@needs_onednn
def test_plain_from_rows_takes_f_linear_from_that_many_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_linear.ENV, "blocked")
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(64, 48, generator=g), torch.randn(64, generator=g)
    packed = cpu_linear.pack(w)
    for rows in (1, 7, 8, 30):
        x = torch.randn(rows, 48, generator=g)
        y = cpu_linear.linear(x, w, b, packed=packed, plain_from_rows=8)
        if rows >= 8:
            assert torch.equal(y, F.linear(x, w, b))  # the very same call
        else:
            assert torch.equal(y, cpu_linear.linear(x, None, b, packed=packed))  # the blocked kernel
    x3 = torch.randn(2, 4, 48, generator=g)  # rows counted over the leading dims
    assert torch.equal(cpu_linear.linear(x3, w, b, packed=packed, plain_from_rows=8), F.linear(x3, w, b))


@needs_onednn
@pytest.mark.parametrize("setting", ["off", "4"])
def test_pack_linears_keeps_plain_weights_only_for_mkl(setting: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_linear.ENV, "blocked")
    monkeypatch.setenv(cpu_linear_rows.ENV, setting)
    d = build_tiny_model("llama3", tmp_path / "m", seed=4)
    model, _ = load_model(d, torch.float32, torch.device("cpu"), max_positions=64)
    cpu_linear.pack_linears(model)
    projections = [m for layer in model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                         layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    for m in projections:
        assert m.packed_weight is not None and m.packed_weight.dim() == 3
        if setting == "off":
            assert m.plain_from_rows is None and m.weight.numel() == 0  # freed: memory unchanged
        else:
            assert m.plain_from_rows == 4 and m.weight.shape == (m.out_features, m.in_features)
            x = torch.randn(6, m.in_features)
            assert torch.equal(m(x), F.linear(x, m.weight, m.bias))


def test_rows_setting_is_parsed_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, parsed in (("auto", "auto"), ("off", "off"), ("512", 512), (" AUTO ", "auto")):
        monkeypatch.setenv(cpu_linear_rows.ENV, value)
        assert cpu_linear_rows.setting() == parsed
    for bad in ("fast", "0", "-3"):
        monkeypatch.setenv(cpu_linear_rows.ENV, bad)
        with pytest.raises(ValueError, match=cpu_linear_rows.ENV):
            cpu_linear_rows.setting()


@pytest.mark.parametrize("gains, expected", [
    ((0.3, 0.3, 0.3, 0.3), 128),  # MKL faster everywhere: from the smallest candidate
    ((-0.2, 0.02, 0.05, 0.12), 512),  # within noise at 256: from 512
    ((0.2, -0.1, 0.2, 0.2), 512),  # a loss at 256 breaks the run: the larger sizes only
    ((0.2, 0.2, 0.2, 0.05), None),  # not enough at the largest: never (no second copy for 5%)
    ((-0.1, -0.1, -0.1, -0.1), None),
])
def test_calibrate_picks_the_smallest_size_of_a_winning_run(gains: tuple[float, ...], expected: int | None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The timings are replaced (blocked 1 ms, MKL 1 - gain ms per size): this checks the choice.
    order = iter([(1.0 - gain, 1.0) for gain in gains])  # (MKL, blocked) per size, smallest first
    monkeypatch.setattr(cpu_linear_rows, "_best_pair_ms", lambda mkl, blocked: next(order))
    monkeypatch.setattr(cpu_linear_rows, "MIN_LAYER_BYTES", 0)
    w = torch.randn(32, 16)
    assert cpu_linear_rows.calibrate([w], [cpu_gemm.pack_weight(w)], candidates=(128, 256, 512, 1024)) == expected


def test_calibrate_skips_small_layers() -> None:
    w = torch.randn(32, 16)  # far below MIN_LAYER_BYTES: the blocked kernel, untimed
    assert cpu_linear_rows.calibrate([w], [cpu_gemm.pack_weight(w)]) is None


@pytest.mark.skipif(cpu_gemm.load() is None, reason="the blocked kernel cannot be built here")
def test_calibrate_times_real_kernels() -> None:
    # A layer above the size floor, timed for real: the choice is a candidate or None, and either
    # way the call finishes (what the engine runs at start-up).
    ws = [torch.randn(1024, 576), torch.randn(576, 1536)]
    got = cpu_linear_rows.calibrate(ws, [cpu_gemm.pack_weight(w) for w in ws], candidates=(64, 256))
    assert got in (None, 64, 256)


@needs_onednn
def test_no_second_copy_when_memory_is_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "auto" with too little memory available: no calibration, the plain weights freed.
    monkeypatch.setenv(cpu_linear.ENV, "blocked")
    monkeypatch.setenv(cpu_linear_rows.ENV, "auto")
    monkeypatch.setattr(cpu_linear_rows, "available_memory_bytes", lambda: 1024)
    monkeypatch.setattr(cpu_linear_rows, "calibrate", lambda *a, **k: pytest.fail("calibrated anyway"))
    model, _ = load_model(build_tiny_model("llama3", tmp_path / "m", seed=4), torch.float32, "cpu", max_positions=64)
    cpu_linear.pack_linears(model)
    assert all(layer.mlp.down_proj.plain_from_rows is None and layer.mlp.down_proj.weight.numel() == 0
               for layer in model.layers)


def test_available_memory_is_read() -> None:
    got = cpu_linear_rows.available_memory_bytes()
    assert got is None or got > 0
