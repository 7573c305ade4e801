"""Greedy parity with HF transformers on tiny random models, every feature on and off.

Each architecture (and rope scaling type) is built from a real config,
shrunk, saved in HF format and loaded through kvserve's loader.  One
`generate` call runs 16 prompts of 1-300 tokens, some sharing prefixes.
Near-ties follow the rule in ARCHITECTURE.md (see `compare_greedy`).
"""
from __future__ import annotations

import random

import pytest
import torch

from kvserve import LLM, SamplingParams
from tests.helpers.tiny_models import TINY_SPECS, build_tiny_model, compare_greedy, hf_greedy

MAX_NEW = 16
ARCHS = list(TINY_SPECS)

CONFIGS = {
    "default": {},
    "no-prefix-caching": {"enable_prefix_caching": False},
    "chunked": {"max_num_batched_tokens": 37},
    "preemption": {"num_kv_blocks": 24, "max_num_batched_tokens": 64},
    "reference-attention": {"attention_backend": "reference"},
    "torch-attention": {"attention_backend": "torch"},
}


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [1, 2, 15, 16, 17, 33, 64, 100, 129, 160, 200, 250, 300, 48, 7, 90]
    prompts = [[rng.randrange(512) for _ in range(n)] for n in lens]
    prompts[13] = prompts[12][:40] + prompts[13][:8]  # shares 2.5 blocks with prompt 12
    prompts[14] = prompts[11][:32] + [1, 2, 3]  # shares exactly 2 blocks with prompt 11
    prompts[15] = list(prompts[9][:90])  # a strict prefix of prompt 9
    return prompts


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request, tmp_path_factory):
    name = request.param
    model_dir = build_tiny_model(name, tmp_path_factory.mktemp(name))
    prompts = make_prompts()
    return name, model_dir, prompts, hf_greedy(model_dir, prompts, MAX_NEW)


def _check(ref, outs, min_exact: int) -> None:
    exact = 0
    for i, ((hf_toks, hf_lps), out) in enumerate(zip(ref, outs)):
        for sample in out.outputs:
            lps = [{t: lp.logprob for t, lp in d.items()} for d in sample.logprobs]
            ok, pos = compare_greedy(hf_toks, hf_lps, sample.token_ids, lps)
            assert ok, f"prompt {i}: diverged at {pos} without a near-tie: hf={hf_toks} ours={sample.token_ids}"
            exact += pos == -1
    assert exact >= min_exact, f"only {exact} sequences matched exactly"


@pytest.mark.parametrize("config", list(CONFIGS))
def test_greedy_matches_hf(arch_case, config):
    name, model_dir, prompts, ref = arch_case
    llm = LLM(str(model_dir), **CONFIGS[config])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    _check(ref, outs, min_exact=len(prompts) - 2)
    core = llm.engine.core
    core.kv_manager.check_integrity()
    assert core.kv_manager.num_free_blocks == core.kv_manager.num_blocks
    if config == "preemption":
        assert core.scheduler.num_preemptions > 0, "the small pool was meant to force preemption"
    if config == "default":
        assert any(o.metrics.num_cached_tokens > 0 for o in outs), "shared prefixes should hit the cache"
    if config == "chunked":
        assert core.stats.num_steps > MAX_NEW + 20


def test_greedy_matches_hf_with_mkl_at_prefill_sizes(arch_case, monkeypatch):
    # The calibrated MKL dispatch (kvserve.models.cpu_linear_rows) forced on from 32 rows: prefill
    # chunks go through F.linear, decode steps through the blocked kernel, in one run.
    from kvserve.models import cpu_linear_rows

    name, model_dir, prompts, ref = arch_case
    monkeypatch.setenv(cpu_linear_rows.ENV, "32")
    llm = LLM(str(model_dir))
    model = llm.engine.core.model
    dispatched = [m for m in model.modules() if getattr(m, "plain_from_rows", None) == 32]
    assert dispatched, "some projection should keep its plain weight for MKL"
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    _check(ref, outs, min_exact=len(prompts) - 2)


def test_n_greater_than_one_shares_blocks_and_matches(arch_case):
    name, model_dir, prompts, ref = arch_case
    llm = LLM(str(model_dir), enable_prefix_caching=False)
    params = SamplingParams(n=3, temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:8]], params, use_tqdm=False)
    for out in outs:
        assert [s.index for s in out.outputs] == [0, 1, 2]
    _check(ref[:8], outs, min_exact=3 * 8 - 2)


def test_logprobs_agree_with_hf(arch_case):
    name, model_dir, prompts, ref = arch_case
    llm = LLM(str(model_dir))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:6]], params, use_tqdm=False)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for (hf_toks, hf_lps), out, prompt in zip(ref, outs, prompts):
        sample = out.outputs[0]
        for pos, (tok, d) in enumerate(zip(sample.token_ids, sample.logprobs)):
            if tok != hf_toks[pos]:
                break
            assert abs(d[tok].logprob - hf_lps[pos, tok].item()) < 1e-3
            top = hf_lps[pos].topk(3).indices.tolist()
            assert [t for t, lp in sorted(d.items(), key=lambda x: x[1].rank)][:3] == top or tok not in top
        # Prompt logprobs: HF's teacher-forced distribution at every prompt position.
        with torch.no_grad():
            full = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for i in range(1, len(prompt)):
            d = out.prompt_logprobs[i]
            assert abs(d[prompt[i]].logprob - full[i - 1, prompt[i]].item()) < 1e-3
