"""The offline API end to end: text, stop strings, seeds, chat, loader errors, dtypes."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from kvserve import LLM, SamplingParams
from tests.helpers.tiny_models import build_tiny_model, compare_greedy, hf_greedy


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("qwen_text"), tokenizer="qwen2.5-0.5b",
                            overrides={"vocab_size": 151936})


@pytest.fixture(scope="module")
def text_llm(text_model):
    return LLM(str(text_model))


def test_text_prompt_round_trip_and_metrics(text_llm):
    tok = text_llm.get_tokenizer()
    outs = text_llm.generate(["Hello there", "The capital of France is"],
                             SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(["Hello there", "The capital of France is"], outs):
        assert out.prompt == prompt and out.prompt_token_ids == tok.encode(prompt)
        o = out.outputs[0]
        assert len(o.token_ids) == 12 and o.finish_reason == "length"
        assert o.text == tok.decode(o.token_ids)
        m = out.metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time


def test_stop_string_finishes_with_stop_reason(text_llm):
    base = text_llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    # Pick a stop string from the middle of the greedy text (deterministic).
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), f"degenerate text {text!r}"
    out = text_llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                          stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    assert len(out.token_ids) < 20
    assert text_llm.engine.core.kv_manager.num_free_blocks == text_llm.engine.core.kv_manager.num_blocks


def test_seeded_request_is_independent_of_the_batch(text_llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=42, ignore_eos=True)
    alone = text_llm.generate(["Seeded prompt"], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = text_llm.generate(["a", "Seeded prompt", "bb ccc", "d"], [others, sp, others, others],
                              use_tqdm=False)[1].outputs[0].token_ids
    assert alone == mixed
    unseeded = text_llm.generate(["Seeded prompt"] * 2, others, use_tqdm=False)
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_n_samples_differ_when_sampling(text_llm):
    out = text_llm.generate(["Tell me"], SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=3,
                                                        ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs) == 4
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_chat_applies_the_template(text_llm):
    tok = text_llm.get_tokenizer()
    messages = [{"role": "user", "content": "Hi!"}]
    out = text_llm.chat(messages, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == tok.encode(expected)
    assert "<|im_start|>assistant" in expected


def test_never_fitting_prompt_is_rejected_and_abort_frees(text_model):
    llm = LLM(str(text_model), num_kv_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([{"prompt_token_ids": list(range(100))}], SamplingParams(max_tokens=1), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    rid = llm.engine.add_request({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=5))
    llm.engine.step()
    out = llm.engine.abort(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    kv = llm.engine.core.kv_manager
    kv.check_integrity()
    assert kv.num_free_blocks == kv.num_blocks and not llm.engine.has_unfinished_requests()


def test_sharded_checkpoint_loads_identically(tmp_path):
    single = build_tiny_model("llama3", tmp_path / "single")
    sharded = build_tiny_model("llama3", tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    prompts = [{"prompt_token_ids": list(range(5, 40))}]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = LLM(str(single)).generate(prompts, sp, use_tqdm=False)[0].outputs[0].token_ids
    b = LLM(str(sharded)).generate(prompts, sp, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b


def test_loader_errors_name_the_file_and_tensor(tmp_path):
    d = build_tiny_model("llama3", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    bad = tmp_path / "arch"
    shutil.copytree(d, bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"config\.json.*GPT2LMHeadModel.*not supported"):
        LLM(str(bad))
    shape = tmp_path / "shape"
    shutil.copytree(d, shape)
    (shape / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"model\.safetensors.*mlp\.(gate|up|down)_proj\.weight.*shape"):
        LLM(str(shape))
    missing = tmp_path / "missing"
    shutil.copytree(d, missing)
    (missing / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_dtypes_follow_hf_within_the_tie_rule(tmp_path, dtype):
    d = build_tiny_model("qwen3", tmp_path / "m", dtype=dtype)
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 90)]
    ref = hf_greedy(d, prompts, 8, dtype=dtype)
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    outs = LLM(str(d), dtype=name).generate([{"prompt_token_ids": p} for p in prompts],
                                             SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5),
                                             use_tqdm=False)
    exact = 0
    for (toks, lps), out in zip(ref, outs):
        o = out.outputs[0]
        ok, pos = compare_greedy(toks, lps, o.token_ids, [{t: l.logprob for t, l in d.items()} for d in o.logprobs])
        assert ok, (toks, o.token_ids)
        exact += pos == -1
    assert exact >= 2


def _assert_same_prompt_logprobs(a, b) -> None:
    """Same positions, same token sets, logprobs equal within batching noise."""
    assert len(a.prompt_logprobs) == len(b.prompt_logprobs)
    for da, db in zip(a.prompt_logprobs, b.prompt_logprobs):
        assert (da is None) == (db is None)
        if da is not None:
            assert da.keys() == db.keys()
            assert all(abs(da[t].logprob - db[t].logprob) < 1e-3 for t in da)


def test_prompt_logprobs_are_complete_after_a_prefix_hit_and_a_mid_prefill_preemption(tmp_path):
    """Prompt logprobs need every position's logits: a cached prefix is not read for them, and
    positions recomputed after a preemption are not recorded twice."""
    model = build_tiny_model("llama-tied", tmp_path / "m")
    prompt = {"prompt_token_ids": [(7 * i) % 500 + 3 for i in range(61)]}
    sp = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=2, ignore_eos=True)
    llm = LLM(str(model), block_size=8, num_kv_blocks=64)
    first = llm.generate([prompt], sp, use_tqdm=False)[0]
    again = llm.generate([prompt], sp, use_tqdm=False)[0]  # its prefix blocks are cached now
    assert len(first.prompt_logprobs) == 61 and first.prompt_logprobs[0] is None
    assert again.num_cached_tokens == 0
    _assert_same_prompt_logprobs(again, first)
    # 12-token prefill chunks and a pool too small for three 73-token requests at once:
    # some are preempted part-way through their prefill and recomputed.
    tight = LLM(str(model), block_size=8, num_kv_blocks=20, max_num_batched_tokens=12, max_num_seqs=3,
                enable_prefix_caching=False)
    outs = tight.generate([prompt] * 3, sp, use_tqdm=False)
    assert tight.engine.core.scheduler.num_preemptions > 0
    for out in outs:
        _assert_same_prompt_logprobs(out, first)
        assert out.outputs[0].token_ids == first.outputs[0].token_ids
