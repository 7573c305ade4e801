"""Benchmarks on GGUF / built-in models: model resolution, the chat workload, chat-format ShareGPT prompts."""
from __future__ import annotations

import argparse

import pytest

from kvserve.bench import offline
from kvserve.bench.datasets import LengthDist, sharegpt_requests
from kvserve.bench.errors import BenchInputError
from kvserve.bench.paths import default_file
from kvserve.bench.tokens import load_tokenizer
from tests.unit.models.tiny_gguf import build_tiny_hf, hf_to_gguf, tiny_bpe_tokenizer, uniform


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench_gguf")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVSERVE_CACHE_DIR", str(base / "cache"))
    hf = build_tiny_hf("llama-tied", base / "hf")
    yield hf_to_gguf(hf, base / "chat.gguf", uniform("Q8_0"), tokenizer=tiny_bpe_tokenizer())
    mp.undo()


def test_models_by_path_and_name(chat_gguf):
    assert offline.resolve_bench_model(str(chat_gguf)) == chat_gguf
    assert offline.model_config_dict(chat_gguf)["vocab_size"] == 512
    hf_dir = offline.hf_model_dir(chat_gguf)
    assert (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()
    assert offline.resolve_bench_model("kvserve-demo").name == "demo_model"
    with pytest.raises(BenchInputError, match="not a built-in model name"):
        offline.resolve_bench_model("no-such-model")


def test_chat_workload_is_sharegpt_through_the_chat_template(chat_gguf):
    reqs = offline.chat_workload(chat_gguf, 5, 64, 8, seed=0)
    tok = load_tokenizer(chat_gguf)
    assert len(reqs) == 5 and all(r.output_len == 8 and r.prompt_len == len(r.prompt) <= 64 for r in reqs)
    for r in reqs:
        text = tok.decode(r.prompt)
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert [r.prompt for r in reqs] == [r.prompt for r in offline.chat_workload(chat_gguf, 5, 64, 8, seed=0)]
    args = argparse.Namespace(workload="chat", num_prompts=1, input_len_range="1:2", output_len=1)
    offline.apply_workload(args)
    assert (args.num_prompts, args.output_len) == offline.CHAT_WORKLOAD[::2]


def test_offline_bench_runs_a_gguf_model_against_hf(chat_gguf, tmp_path):
    import json

    ns = argparse.Namespace(
        model=str(chat_gguf), num_prompts=2, input_len_range="8:16", output_len=3, baselines="hf-static",
        workload=None, hf_batch_size=2, vllm_venv=None, no_install_vllm=True, no_engine=False, seed=0,
        dtype="float32", hw="h100", result_file=str(tmp_path / "r.json"), block_size=16, max_num_seqs=None,
        max_num_batched_tokens=None, kv_cache_memory=None, num_kv_blocks=64, no_prefix_caching=False)
    assert offline.run_offline(ns) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    text = json.dumps(out)
    assert "hf-static" in text and "engine" in text


def test_sharegpt_chat_prompt_format(chat_gguf):
    path = default_file("sharegpt")
    if not path.is_file():
        pytest.skip(f"{path}: shared ShareGPT data not present")
    tok = load_tokenizer(chat_gguf)
    reqs = sharegpt_requests(path, 3, tok, LengthDist("fixed", 4), "chat", seed=1, max_input_len=80)
    assert all(isinstance(r.prompt, list) and len(r.prompt) <= 80 for r in reqs)
    assert tok.decode(reqs[0].prompt).startswith("<|im_start|>user\n")
    gpt2 = load_tokenizer(default_file("sharegpt").parents[2] / "tokenizers" / "gpt2")
    with pytest.raises(BenchInputError, match="chat template"):
        sharegpt_requests(path, 1, gpt2, LengthDist("fixed", 4), "chat", seed=1)
