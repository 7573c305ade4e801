"""GGUF files written in the test: names, config, tokenizer, errors, and the dequantized cache."""
from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from kvserve import LLM, SamplingParams
from kvserve.models.gguf import cache as gcache
from kvserve.models.gguf.checkpoint import iter_gguf_checkpoint, load_gguf_tokenizer
from kvserve.models.gguf.names import gguf_name, hf_name, permute_rows, unpermute_rows
from kvserve.models.model_config import parse_model_config
from tests.unit.models.tiny_gguf import build_tiny_hf, hf_to_gguf, mixed, tiny_bpe_tokenizer, uniform

SMALL = dict(num_kv_blocks=64, max_num_batched_tokens=256)
PROMPTS = [[5, 6, 7, 8, 9, 10], list(range(20, 70))]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(d))
    monkeypatch.delenv("KVSERVE_GGUF_CACHE", raising=False)
    return d / "gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("gguf")
    hf = build_tiny_hf("llama3", base / "hf")
    path = hf_to_gguf(hf, base / "tiny-llama.gguf", mixed, tokenizer=tiny_bpe_tokenizer())
    return hf, path


def _greedy(model: str, **kw) -> list[list[int]]:
    llm = LLM(model, **{**SMALL, **kw})
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


# ----------------------------------------------------------------------------- names


def test_names_round_trip_and_the_permutation_is_llama_cpps():
    for hf in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
               "model.layers.7.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.bias",
               "model.layers.2.self_attn.q_norm.weight", "model.layers.1.mlp.down_proj.weight",
               "model.layers.3.post_attention_layernorm.weight"]:
        assert hf_name(gguf_name(hf)) == hf
    assert hf_name("blk.0.attn_q.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_gate_exps.weight") is None
    w = torch.randn(4 * 2 * 3, 5)  # 4 heads of dim 6
    # convert_hf_to_gguf.py's permute, written out with numpy
    ref = w.numpy().reshape(4, 2, 3, 5).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(permute_rows(w, 4).numpy(), ref)
    assert torch.equal(unpermute_rows(permute_rows(w, 4), 4), w)
    assert not torch.equal(permute_rows(w, 4), w)


# ----------------------------------------------------------------------------- config


def test_config_from_metadata_matches_the_hf_config(tiny):
    hf, path = tiny
    a, b = parse_model_config(path), parse_model_config(hf)
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "max_position_embeddings",
                  "tie_word_embeddings", "attention_bias", "qk_norm"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.rms_norm_eps == pytest.approx(b.rms_norm_eps, rel=1e-6)  # stored as float32 in GGUF
    assert a.bos_token_id == 1 and a.eos_token_ids == (2,)


def test_eos_includes_eot_and_linear_rope_scaling(tmp_path):
    hf = build_tiny_hf("llama-linear", tmp_path / "hf", rope_scaling={"rope_type": "linear", "factor": 4.0})

    def meta(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
        w.add_eot_token_id(3)

    path = hf_to_gguf(hf, tmp_path / "linear.gguf", uniform("F32"), tokenizer=tiny_bpe_tokenizer(),
                      extra_metadata=meta)
    cfg = parse_model_config(path)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert cfg.eos_token_ids == (2, 3)
    # F32 weights: the GGUF model is the HF model, scaling included (positions past 50 matter)
    assert _greedy(str(path)) == _greedy(str(hf))


def _minimal_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_type_and_tensor_are_named(tmp_path):
    emb = {"token_embd.weight": np.zeros((16, 32), dtype=np.float32)}
    with pytest.raises(ValueError, match=r"architecture 'gemma2' is not supported; supported: llama, qwen2, qwen3"):
        LLM(str(_minimal_gguf(tmp_path / "g.gguf", "gemma2", emb)))
    f64 = {**emb, "blk.0.ffn_up.weight": np.zeros((64, 32), dtype=np.float64)}
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.ffn_up\.weight' has GGML type F64"):
        LLM(str(_minimal_gguf(tmp_path / "f64.gguf", "llama", f64)), **SMALL)
    odd = {**emb, "blk.0.ffn_gate_exps.weight": np.zeros((4, 64, 32), dtype=np.float32)}
    with pytest.raises(ValueError, match=r"unexpected tensor 'blk\.0\.ffn_gate_exps\.weight' \(GGML type F32\)"):
        LLM(str(_minimal_gguf(tmp_path / "moe.gguf", "llama", odd)), **SMALL)
    freqs = {**emb, "rope_freqs.weight": np.ones(8, dtype=np.float32)}
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        parse_model_config(_minimal_gguf(tmp_path / "r.gguf", "llama", freqs))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf: not a readable GGUF file"):
        parse_model_config(tmp_path / "junk.gguf")


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_from_metadata_equals_transformers_gguf_tokenizer(tiny):
    from transformers import AutoTokenizer

    _hf, path = tiny
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = load_gguf_tokenizer(path, use_cache=False)
    cached = load_gguf_tokenizer(path)  # written to and read back from the cache
    texts = ["hello world, the capital of france", " leading space", "<|im_start|>user\nhi<|im_end|>\n",
             "Ünïcödé 😀 and 123 numbers", ""]
    for tok in (ours, cached):
        for t in texts:
            assert tok.encode(t) == ref.encode(t), t
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        assert (tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
        assert tok.decode(tok.encode(texts[0])) == texts[0]


def test_gguf_without_tokenizer_serves_token_ids(tmp_path):
    hf = build_tiny_hf("qwen2", tmp_path / "hf")
    path = hf_to_gguf(hf, tmp_path / "notok.gguf", uniform("F16"))
    llm = LLM(str(path), **SMALL)
    assert llm.engine.tokenizer is None
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


# ----------------------------------------------------------------------------- the cache


def _tensors(path: Path, use_cache: bool) -> dict[str, torch.Tensor]:
    return {name: read().clone() for name, _src, read in iter_gguf_checkpoint(path, use_cache=use_cache)}


def test_cache_holds_exactly_what_the_direct_path_reads(tiny, cache_dir):
    _hf, path = tiny
    direct = _tensors(path, use_cache=False)
    assert not cache_dir.exists()
    cached = _tensors(path, use_cache=True)
    assert set(direct) == set(cached)
    for name in direct:
        assert direct[name].dtype == cached[name].dtype and torch.equal(direct[name], cached[name]), name
    (d,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    record = json.loads((d / "source.json").read_text())
    st = path.stat()
    assert (record["size"], record["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in d.iterdir()}


def test_second_load_reads_only_the_cache_and_a_touched_file_rebuilds_it(tiny, cache_dir, monkeypatch):
    _hf, path = tiny
    first = _greedy(str(path))
    (d,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    built = (d / "source.json").stat().st_mtime_ns

    def no_gguf(*_a, **_k):
        raise AssertionError("the GGUF file was parsed although a valid cache exists")

    from kvserve.models.gguf import checkpoint

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "open_gguf", no_gguf)
        m.setattr(gcache, "open_gguf", no_gguf)
        assert _greedy(str(path)) == first
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        assert gcache.valid_cache(path) is None  # stale: the file changed since it was built
        assert _greedy(str(path)) == first
        assert (d / "source.json").stat().st_mtime_ns != built
        assert json.loads((d / "source.json").read_text())["mtime_ns"] == path.stat().st_mtime_ns
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_cache_off_reads_the_gguf_and_gives_the_same_tokens(tiny, cache_dir, monkeypatch):
    _hf, path = tiny
    monkeypatch.setenv("KVSERVE_GGUF_CACHE", "0")
    direct = _greedy(str(path))
    assert not cache_dir.exists()
    monkeypatch.delenv("KVSERVE_GGUF_CACHE")
    assert _greedy(str(path)) == direct
    assert cache_dir.exists()


def test_an_unwritable_cache_falls_back_to_the_gguf(tiny, tmp_path, monkeypatch):
    _hf, path = tiny
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(blocker))  # mkdir under a file: OSError
    assert gcache.ensure_cache(path) is None
    assert len(_greedy(str(path))[0]) == 8


def test_streamed_safetensors_read_back(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 2, 2).bfloat16()}
    gcache.write_safetensors(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                             iter(tensors.values()))
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    with pytest.raises(ValueError, match="wrote 1 of 2"):
        gcache.write_safetensors(tmp_path / "y.safetensors", [("a", torch.float32, (3, 5)), ("b", torch.float32, (1,))],
                                 iter([tensors["a"]]))


def test_kv_namespace_fingerprint_of_a_gguf_file(tiny, tmp_path):
    from kvserve.kv_store.namespace import model_fingerprint

    _hf, path = tiny
    fp = model_fingerprint(path)
    assert fp == model_fingerprint(path) and fp.startswith("tiny-llama.gguf@")
    other = tmp_path / "tiny-llama.gguf"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 + 10] ^= 0xFF  # a changed weight byte, inside the middle sample
    other.write_bytes(bytes(data))
    assert model_fingerprint(other) != fp


def test_half_precision_engine_dtype_casts_at_load(tmp_path):
    """Weights are dequantized to float32 (or kept as stored) and cast to the engine dtype by the
    loader, exactly as for a safetensors directory."""
    hf = build_tiny_hf("qwen3", tmp_path / "hf", head_dim=128)
    path = hf_to_gguf(hf, tmp_path / "q3.gguf", uniform("F32"), tokenizer=tiny_bpe_tokenizer())
    for dtype in ("bfloat16", "float16"):
        assert _greedy(str(path), dtype=dtype) == _greedy(str(hf), dtype=dtype), dtype
