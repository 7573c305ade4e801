"""The committed demo model: standard HF files, loads with transformers, answers retrieval prompts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kvserve
from kvserve.eval import tasks

DEMO_MODEL = Path(kvserve.__file__).resolve().parent / "demo_model"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model.safetensors").exists(), reason="demo model not built")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    return model, tok


def test_files_are_standard_and_small():
    for name in FILES:
        assert (DEMO_MODEL / name).is_file(), name
    assert sum(p.stat().st_size for p in DEMO_MODEL.iterdir() if p.is_file()) < 50 * 2**20
    cfg = json.loads((DEMO_MODEL / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["max_position_embeddings"] >= 4096
    assert cfg["rope_theta"] > 0 and cfg.get("rope_scaling") is None
    tok_cfg = json.loads((DEMO_MODEL / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_cfg and tok_cfg["bos_token"] and tok_cfg["eos_token"]
    gen = json.loads((DEMO_MODEL / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"]


def test_tokenizer_matches_model(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert len(tok) <= model.config.vocab_size
    assert tok.eos_token_id == model.config.eos_token_id
    assert tok.bos_token_id == model.config.bos_token_id
    assert tok("ABCD: 4821")["input_ids"][0] == tok.bos_token_id
    assert tok.decode(tok("ABCD: 4821", add_special_tokens=False)["input_ids"]) == "ABCD: 4821"


@torch.no_grad()
def _greedy(model, tok, ids: list[int], max_new: int = 12) -> str:
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    new = out[0, len(ids):].tolist()
    assert tok.eos_token_id in new, "the answer must end with EOS"
    return tok.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("fmt", tasks.FORMATS)
def test_answers_fixed_retrieval_prompts(model_and_tokenizer, fmt):
    model, tok = model_and_tokenizer
    for i, length in enumerate((128, 256, 256, 512)):
        inst = tasks.make_instance("kv_retrieval", length, f"demo-test/{i}", tok, fmt)
        assert tasks.score(inst, _greedy(model, tok, inst.prompt_token_ids(tok))), inst.uid


def test_answers_handwritten_prompt(model_and_tokenizer):
    model, tok = model_and_tokenizer
    lines = ["QWER: 1234", "ASDF: 5678", "ZXCV: 9012", "TYUI: 3456", "GHJK: 7890"]
    prompt = "\n".join([tasks.HEADER, *lines, "Question: What is the value of ZXCV?", "Answer: "])
    assert _greedy(model, tok, tok(prompt)["input_ids"]) == "ZXCV: 9012"
    messages = [{"role": "user", "content": prompt.rsplit("\nAnswer: ", 1)[0].replace("ZXCV?", "ASDF?")}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    assert _greedy(model, tok, ids) == "ASDF: 5678"


def test_kvserve_eval_gives_the_accuracy_transformers_gives(model_and_tokenizer):
    """A small fixed suite: `kvserve eval`'s exact-match count equals an independent count made
    with transformers' greedy generation and the task parser on the same instances."""
    from kvserve.eval.runner import EvalSettings, run_eval

    model, tok = model_and_tokenizer
    settings = EvalSettings(tasks=["kv_retrieval", "copy", "arithmetic"], lengths=[128, 256], formats=["plain"],
                            num_per_cell=4, seed=77, token_metrics=False)
    result = run_eval(str(DEMO_MODEL), {}, settings, log=lambda _: None)
    for task in settings.tasks:
        for length in settings.lengths:
            suite = tasks.generate_suite([task], [length], 4, 77, tok, ["plain"])
            expected = 0
            for inst in suite:
                ids = inst.prompt_token_ids(tok)
                max_new = len(tok(inst.answer, add_special_tokens=False)["input_ids"]) + 8
                out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     do_sample=False, max_new_tokens=max_new, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
                expected += tasks.score(inst, tok.decode(out[0, len(ids):], skip_special_tokens=True))
            assert result.accuracy[f"{task}/plain/{length}"]["correct"] == expected, (task, length)


def test_kvserve_greedy_equals_transformers_on_task_prompts(model_and_tokenizer):
    """Parity for the demo model itself: plain and chat task prompts, 24 greedy tokens, exact."""
    from kvserve import LLM, SamplingParams
    from tests.helpers.tiny_models import compare_greedy, hf_greedy

    _, tok = model_and_tokenizer
    prompts = [tasks.make_instance(task, length, f"parity/{i}", tok, fmt).prompt_token_ids(tok)
               for i, (task, length, fmt) in enumerate([("kv_retrieval", 256, "plain"), ("two_hop", 512, "chat"),
                                                         ("arithmetic", 128, "plain"), ("copy", 256, "chat")])]
    ref = hf_greedy(DEMO_MODEL, prompts, 24)
    outs = LLM(str(DEMO_MODEL), block_size=16).generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5), use_tqdm=False)
    for (hf_tokens, hf_lp), out in zip(ref, outs):
        o = out.outputs[0]
        ok, where = compare_greedy(hf_tokens, hf_lp, o.token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.logprobs])
        assert ok, f"diverged at {where}"
