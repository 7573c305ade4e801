"""Codec round trips: raw is bit-exact, lossy codecs meet their stated error bounds."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from kvserve.kv_store.codecs import CodecError, available_codecs, get_codec
from kvserve.kv_store.codecs.cachegen import CacheGenCodec
from kvserve.kv_store.codecs.entropy import _geometric_table, get_entropy_coder

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPE = (6, 2, 16, 2, 32)   # [L, 2, T, H, D]; 6 layers -> two per "third"
HAS_CONSTRICTION = importlib.util.find_spec("constriction") is not None


def kv_like(dtype: torch.dtype, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """Gaussian KV with the features codecs must survive: per-channel offsets and
    scales in K (outlier channels), a smooth token trend, and a zero channel."""
    g = torch.Generator().manual_seed(seed)
    L, _, T, H, D = shape
    x = torch.randn(shape, generator=g)
    x[:, 0] *= torch.rand(L, 1, H, D, generator=g) * 4 + 0.1
    x[:, 0, :, :, 3] += 20.0                                     # outlier channel
    x += torch.linspace(0, 1, T).view(1, 1, T, 1, 1)             # token trend
    x[:, :, :, 1, 5] = 0.0                                       # dead channel
    return x.to(dtype)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at |x| (for output-rounding slack)."""
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    return torch.maximum(x.abs() * eps, torch.full_like(x, tiny))


def test_registry() -> None:
    assert {"raw", "int8", "fp8", "cachegen"} <= set(available_codecs())
    with pytest.raises(ValueError):
        get_codec("nope")
    with pytest.raises(ValueError):
        get_codec("int8-x")
    c = get_codec("cachegen-b654-a8")
    assert isinstance(c, CacheGenCodec) and c.layer_bits == (6, 5, 4) and c.anchor_interval == 8
    # Parameters are part of the identity (and hence of the namespace).
    assert len({get_codec(s).identity for s in ["cachegen", "cachegen-b654", "cachegen-a8", "int8", "fp8"]}) == 5


@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_is_bit_exact_including_special_values(dtype: torch.dtype) -> None:
    x = kv_like(dtype)
    flat = x.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0,
                             torch.finfo(dtype).tiny / 2, torch.finfo(dtype).max]).to(dtype)
    codec = get_codec("raw")
    y = codec.decode(codec.encode(x), dtype, tuple(x.shape))
    assert y.dtype == dtype and y.shape == x.shape
    assert len(codec.encode(x)) == x.numel() * x.element_size()
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(y.view(bits), x.view(bits))


def _int8_bound(x: torch.Tensor) -> torch.Tensor:
    k_amax = x[:, 0].abs().amax(dim=1, keepdim=True)
    v_amax = x[:, 1].abs().amax(dim=3, keepdim=True)
    k = (k_amax / 127).expand_as(x[:, 0])
    v = (v_amax / 127).expand_as(x[:, 1])
    # half a step; fp16 scale rounding up adds at most 2^-10 relative
    return torch.stack([k, v], dim=1) * 0.5 * (1 + 2**-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_error_bound(dtype: torch.dtype) -> None:
    x = kv_like(dtype)
    codec = get_codec("int8")
    payload = codec.encode(x)
    y = codec.decode(payload, dtype, tuple(x.shape))
    assert y.dtype == dtype and y.shape == x.shape
    xf, yf = x.double(), y.double()
    bound = _int8_bound(xf) + ulp(yf, dtype)
    assert bool(((xf - yf).abs() <= bound).all())
    assert bool((y[:, :, :, 1, 5] == 0).all())  # zero channel stays exactly zero
    L, _, T, H, D = x.shape
    assert len(payload) == 2 * L * T * H * D + 2 * (L * H * D + L * T * H)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_error_bound(dtype: torch.dtype) -> None:
    x = kv_like(dtype)
    codec = get_codec("fp8")
    y = codec.decode(codec.encode(x), dtype, tuple(x.shape))
    xf, yf = x.double(), y.double()
    scale = _int8_bound(xf) * 2 * 127 / 448          # = absmax / 448 (with fp16 slack)
    bound = torch.maximum(xf.abs() * 2**-4, scale * 2**-9) * (1 + 2**-9) + ulp(yf, dtype)
    assert bool(((xf - yf).abs() <= bound).all())
    rel = float((xf - yf).norm() / xf.norm())
    assert 0 < rel < 0.05


def _cachegen_bound(x: torch.Tensor, bits: tuple[int, int, int]) -> torch.Tensor:
    L = x.shape[0]
    third = (torch.arange(L) * 3) // L
    levels = (2 ** (torch.tensor(bits)[third] - 1) - 1).double().view(L, 1, 1, 1, 1)
    amax = x.abs().amax(dim=2, keepdim=True)
    return amax / levels * 2 ** (1 / 8) / 2 * (1 + 1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", ["cachegen", "cachegen-b654-a4", "cachegen-b888-a1"])
def test_cachegen_error_bound(dtype: torch.dtype, spec: str) -> None:
    x = kv_like(dtype)
    codec = get_codec(spec)
    assert isinstance(codec, CacheGenCodec)
    payload = codec.encode(x)
    y = codec.decode(payload, dtype, tuple(x.shape))
    assert y.dtype == dtype and y.shape == x.shape
    xf, yf = x.double(), y.double()
    bound = _cachegen_bound(xf, codec.layer_bits) + 2 * ulp(yf, dtype)
    assert bool(((xf - yf).abs() <= bound).all())
    assert bool((y[:, :, :, 1, 5] == 0).all())
    assert len(payload) < x.numel() * 2   # smaller than fp16 raw


def test_cachegen_gives_early_layers_more_bits() -> None:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    codec = get_codec("cachegen-b864")
    y = codec.decode(codec.encode(x), torch.float32, SHAPE)
    err = (y - x).pow(2).mean(dim=(1, 2, 3, 4)).sqrt()   # per layer
    assert float(err[:2].max()) < float(err[2:4].min()) and float(err[2:4].max()) < float(err[4:].min())


def test_cachegen_anchor_deltas_exploit_token_locality() -> None:
    g = torch.Generator().manual_seed(2)
    L, _, T, H, D = SHAPE
    # Piecewise-stationary tokens: each run of 4 tokens shares a level per
    # channel (plus small noise); levels differ between runs, so the per-channel
    # range is wide and direct symbols are spread out, but deltas to the run's
    # first token (the anchor, with a4) are tiny.
    levels = torch.randn(L, 2, T // 4, H, D, generator=g).repeat_interleave(4, dim=2)
    smooth = levels + 0.005 * torch.randn(SHAPE, generator=g)
    iid = torch.randn(SHAPE, generator=g)
    codec = get_codec("cachegen-b888-a4")
    smooth_payload, iid_payload = codec.encode(smooth), codec.encode(iid)
    # Mode bytes follow the version byte: the encoder picks deltas per (layer, kv)
    # exactly where they pay.
    assert set(smooth_payload[1:1 + 2 * L]) == {1}
    assert set(iid_payload[1:1 + 2 * L]) == {0}
    # Same quantization without deltas (a1: every token is an anchor) costs far more.
    no_delta = get_codec("cachegen-b888-a1").encode(smooth)
    assert len(smooth_payload) < 0.7 * len(no_delta)
    y = codec.decode(smooth_payload, torch.float32, SHAPE)
    assert torch.allclose(y, smooth, atol=float(_cachegen_bound(smooth.double(), (8, 8, 8)).max()) + 1e-6)


@pytest.mark.parametrize("spec", ["int8", "fp8", "cachegen"])
def test_lossy_codecs_refuse_non_finite_input(spec: str) -> None:
    x = kv_like(torch.float32)
    x[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(CodecError):
        get_codec(spec).encode(x)


@pytest.mark.parametrize("spec", ["raw", "int8", "fp8", "cachegen"])
def test_truncated_payload_raises_codec_error(spec: str) -> None:
    x = kv_like(torch.float16)
    codec = get_codec(spec)
    payload = codec.encode(x)
    for cut in (0, 1, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CodecError):
            codec.decode(payload[:cut], torch.float16, tuple(x.shape))


def test_all_zero_block_roundtrips_exactly() -> None:
    x = torch.zeros(SHAPE, dtype=torch.bfloat16)
    for spec in ["int8", "fp8", "cachegen"]:
        codec = get_codec(spec)
        assert torch.equal(codec.decode(codec.encode(x), torch.bfloat16, SHAPE), x)


@pytest.mark.skipif(not HAS_CONSTRICTION, reason="constriction not installed (optional ANS coder)")
def test_cachegen_ans_coder_roundtrip_and_matches_zstd_reconstruction() -> None:
    x = kv_like(torch.bfloat16)
    ans, zstd = get_codec("cachegen-ans"), get_codec("cachegen")
    y_ans = ans.decode(ans.encode(x), torch.bfloat16, SHAPE)
    y_zstd = zstd.decode(zstd.encode(x), torch.bfloat16, SHAPE)
    assert torch.equal(y_ans, y_zstd)   # entropy coding is lossless: same quantized values
    # the geometric table is built deterministically and keeps every symbol codable
    t = _geometric_table(40000)
    assert np.array_equal(t, _geometric_table(40000)) and t.min() > 0 and t.argmax() == 128


def test_entropy_coders_roundtrip_streams() -> None:
    rng = np.random.default_rng(0)
    streams = [rng.integers(-128, 128, n).astype(np.int8) for n in (0, 1, 17, 300)]
    names = ["zstd"] + (["ans"] if HAS_CONSTRICTION else [])
    for name in names:
        coder = get_entropy_coder(name)
        out = coder.decode(coder.encode(streams), [len(s) for s in streams])
        assert all(np.array_equal(a, b) for a, b in zip(streams, out))
