"""kvserve on a GGUF file against transformers on the same file (`from_pretrained(dir, gguf_file=...)`).

Tiny random llama / qwen2 / qwen3 models are converted in the test (tests/unit/models/tiny_gguf.py)
with every supported tensor type in one file (`mixed`: Q8_0 embedding, F16 head, K-quants, Q4/Q5
legacy types, BF16, F16, F32), and with all weights in Q4_K.  transformers reads the file with its
own GGUF code (names, Q/K un-permutation, gguf.quants dequantization), so the two loaders are
independent.  Rule: greedy tokens equal (near-ties as in ARCHITECTURE.md), and where they agree the
chosen token's logprob within LOGPROB_TOL.
"""
from __future__ import annotations

import pytest
import torch

from kvserve import LLM, SamplingParams
from tests.helpers.tiny_models import compare_greedy
from tests.parity.test_parity_hf import make_prompts
from tests.unit.models.tiny_gguf import build_tiny_hf, hf_to_gguf, mixed, tiny_bpe_tokenizer, uniform

MAX_NEW = 12
LOGPROB_TOL = 1e-3  # both fp32 on the same dequantized weights: only summation order differs
CASES = {
    "llama-mixed": ("llama3", {}, mixed),
    "llama-tied-q4k": ("llama-tied", {}, uniform("Q4_K")),
    "qwen2-mixed": ("qwen2", {}, mixed),
    # transformers' GGUF config for qwen3 has no head_dim key: it takes Qwen3's default, 128
    "qwen3-mixed": ("qwen3", {"head_dim": 128}, mixed),
}


def hf_gguf_greedy(path, prompts, max_new):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            inp = torch.tensor([ids])
            res = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
            out.append((res.sequences[0, len(ids):].tolist(),
                        torch.stack([x[0].float() for x in res.logits]).log_softmax(-1)))
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, monkeypatch_module):
    name = request.param
    tiny_name, overrides, types = CASES[name]
    base = tmp_path_factory.mktemp(name)
    monkeypatch_module.setenv("KVSERVE_CACHE_DIR", str(base / "cache"))
    hf = build_tiny_hf(tiny_name, base / "hf", **overrides)
    path = hf_to_gguf(hf, base / f"{name}.gguf", types, tokenizer=tiny_bpe_tokenizer())
    prompts = make_prompts()
    return name, path, prompts, hf_gguf_greedy(path, prompts, MAX_NEW)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_gguf_greedy_matches_transformers_gguf(case):
    name, path, prompts, ref = case
    _check(name, LLM(str(path), num_kv_blocks=256), prompts, ref)
    if name == "llama-mixed":  # the other attention backend, with chunked prefill
        _check(name, LLM(str(path), num_kv_blocks=256, attention_backend="torch", max_num_batched_tokens=37),
               prompts, ref)


def _check(name, llm, prompts, ref):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    exact, worst = 0, 0.0
    for i, ((hf_toks, hf_lps), out) in enumerate(zip(ref, outs)):
        sample = out.outputs[0]
        lps = [{t: lp.logprob for t, lp in d.items()} for d in sample.logprobs]
        ok, pos = compare_greedy(hf_toks, hf_lps, sample.token_ids, lps)
        assert ok, f"{name} prompt {i}: diverged at {pos} without a near-tie: hf={hf_toks} ours={sample.token_ids}"
        exact += pos == -1
        agree = len(hf_toks) if pos == -1 else pos
        for p in range(agree):
            tok = hf_toks[p]
            worst = max(worst, abs(lps[p][tok] - float(hf_lps[p][tok])))
    assert exact >= len(prompts) - 2, f"{name}: only {exact} of {len(prompts)} sequences matched exactly"
    assert worst <= LOGPROB_TOL, f"{name}: logprob differs by {worst:.2e}"
