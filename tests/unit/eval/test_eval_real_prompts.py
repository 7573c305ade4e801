"""`kvserve eval` on real prompts: ShareGPT through the chat template, reference perplexity, codec size."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kvserve.eval import real_prompts
from kvserve.eval.runner import EvalSettings, format_tables, run_eval
from kvserve.eval.token_metrics import compare_sequence
from tests.unit.models.tiny_gguf import build_tiny_hf, hf_to_gguf, tiny_bpe_tokenizer, uniform

SETTINGS = dict(accuracy=False, token_prompts=3, token_len=6, batch=4, token_source="sharegpt",
                sharegpt_max_len=96)
ENGINE = dict(block_size=8, num_kv_blocks=128)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random llama as GGUF with a ChatML tokenizer (a chat template), F32 weights."""
    base = tmp_path_factory.mktemp("eval_gguf")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVSERVE_CACHE_DIR", str(base / "cache"))
    hf = build_tiny_hf("llama-tied", base / "hf")
    yield hf_to_gguf(hf, base / "chat.gguf", uniform("F32"), tokenizer=tiny_bpe_tokenizer())
    mp.undo()


def _quiet(_: str) -> None:
    pass


def test_reference_perplexity_is_the_reference_nll_of_the_candidate_tokens():
    ref = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]).log()
    c = compare_sequence(ref, ref, [1, 2])
    assert c.ref_nll_sum == pytest.approx(-(math.log(0.2) + math.log(0.8)))
    from kvserve.eval.token_metrics import TokenMetrics

    m = TokenMetrics()
    m.add(c)
    assert m.summary()["ref_perplexity"] == pytest.approx(math.exp(c.ref_nll_sum / 2))


def test_prompts_are_the_packaged_sharegpt_sample_through_the_chat_template(chat_model):
    from kvserve.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(chat_model)
    texts = real_prompts.load_prompts()
    assert len(texts) == 64 and texts[0].startswith("How to stop automatic updates")
    ids = real_prompts.sharegpt_token_prompts(tok, 5, 64)
    assert all(len(p) <= 64 for p in ids) and len({tuple(p) for p in ids}) == 5
    rendered = tok.decode(ids[0])
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")
    short = real_prompts.chat_prompt_ids(tok, "hi", 64)  # short prompts are not cut
    assert tok.decode(short) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="asked for 65 prompts"):
        real_prompts.sharegpt_token_prompts(tok, 65, 64)


def test_sharegpt_cell_default_engine_matches_and_int8_costs_something(chat_model):
    base = run_eval(str(chat_model), ENGINE, EvalSettings(**SETTINGS), log=_quiet)
    s = base.token_metrics["sharegpt"]
    assert s["sequences"] == 3 and s["tokens"] == 18
    assert s["top1_agreement"] == 1.0 and s["kl_mean"] < 1e-5 and s["ref_perplexity"] >= 1.0
    assert base.settings["token_source"] == "sharegpt" and base.kv_codec is None
    tiers = {**ENGINE, "kv_tiers": "cpu:64MiB"}
    raw = run_eval(str(chat_model), {**tiers, "kv_codec": "raw"}, EvalSettings(**SETTINGS), log=_quiet)
    int8 = run_eval(str(chat_model), {**tiers, "kv_codec": "int8"}, EvalSettings(**SETTINGS), log=_quiet)
    assert raw.kv_codec["ratio_vs_raw"] == pytest.approx(1.0, rel=0.02)  # raw stores the block (+ a header)
    assert 3.0 < int8.kv_codec["ratio_vs_raw"] < 4.0  # fp32 -> int8 plus scales
    assert raw.token_metrics["sharegpt"]["kl_mean"] < 1e-5
    assert int8.token_metrics["sharegpt"]["kl_mean"] > 10 * max(raw.token_metrics["sharegpt"]["kl_mean"], 1e-9)
    table = format_tables(int8)
    assert "| sharegpt | 3 |" in table and "KV codec int8" in table
    json.dumps(int8.to_json())  # the --json output stays serializable


def test_auto_picks_real_prompts_for_a_chat_model_and_retrieval_for_the_demo(chat_model):
    from kvserve.eval.runner import _token_source
    from kvserve.models.builtin import DEMO_MODEL_DIR

    class Chat:
        chat_template = "{{ x }}"

    assert _token_source(EvalSettings(), str(chat_model), Chat()) == "sharegpt"
    assert _token_source(EvalSettings(), str(DEMO_MODEL_DIR), Chat()) == "retrieval"
    assert _token_source(EvalSettings(), str(chat_model), object()) == "retrieval"
    with pytest.raises(ValueError, match="unknown token source"):
        _token_source(EvalSettings(token_source="nope"), str(chat_model), Chat())
