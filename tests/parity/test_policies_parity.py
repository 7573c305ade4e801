"""Greedy parity under every scheduling policy and preemption mode (tiny random model).

* The parity prompts (some sharing prefixes), generated under each policy with a small KV pool
  that forces preemption, match HF transformers (the near-tie rule of compare_greedy);
* swap round trip: with preemption by swap, and no prefix cache to hide a bad copy, every
  request produces the tokens it produces when never preempted, and blocks really went
  through the host buffer.
"""
from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.request import SLO
from tests.helpers.tiny_models import build_tiny_model, compare_greedy, hf_greedy
from tests.parity.test_parity_hf import make_prompts

MAX_NEW = 12
SMALL_POOL = {"num_kv_blocks": 24, "max_num_batched_tokens": 64, "swap_space": 0.01}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model_dir = build_tiny_model("llama3", tmp_path_factory.mktemp("policies"))
    prompts = make_prompts()[:12]
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_NEW)


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)


@pytest.mark.parametrize("policy, mode", [("fcfs", "recompute"), ("priority", "swap"), ("fair", "auto"),
                                          ("slo", "swap")])
def test_policies_match_hf_under_preemption(case, policy, mode):
    model_dir, prompts, ref = case
    llm = LLM(str(model_dir), scheduling_policy=policy, preemption_mode=mode, tenant_weights="t0=2",
              default_slo_tpot_ms=50.0, **SMALL_POOL)
    n = len(prompts)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _params(), use_tqdm=False,
                        priority=[i % 3 for i in range(n)], tenant=[f"t{i % 2}" for i in range(n)],
                        slo=[SLO(ttft_s=0.5 + i) if i % 2 else None for i in range(n)])
    exact = 0
    for i, ((hf_toks, hf_lps), out) in enumerate(zip(ref, outs)):
        sample = out.outputs[0]
        lps = [{t: lp.logprob for t, lp in d.items()} for d in sample.logprobs]
        ok, pos = compare_greedy(hf_toks, hf_lps, sample.token_ids, lps)
        assert ok, f"{policy}/{mode} prompt {i}: diverged at {pos}: hf={hf_toks} ours={sample.token_ids}"
        exact += pos == -1
    assert exact >= n - 2
    core = llm.engine.core
    core.kv_manager.check_integrity()
    assert core.kv_manager.num_free_blocks == core.kv_manager.num_blocks
    assert core.scheduler.num_preemptions > 0, "the small pool was meant to force preemption"
    assert sum(o.metrics.num_preemptions for o in outs) == core.scheduler.num_preemptions
    if core.scheduler.swap is not None:
        core.scheduler.swap.check_integrity()


def test_swap_round_trip_produces_the_tokens_of_a_run_never_preempted(case):
    model_dir, prompts, _ = case
    batch = [{"prompt_token_ids": p} for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    never = LLM(str(model_dir), enable_prefix_caching=False).generate(batch, params, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in never) == 0
    llm = LLM(str(model_dir), enable_prefix_caching=False, preemption_mode="swap", **SMALL_POOL)
    outs = llm.generate(batch, params, use_tqdm=False)
    sched = llm.engine.core.scheduler
    assert sched.preemptions_by.get(("kv_blocks", "swap"), 0) > 0
    assert sched.swap is not None and sched.swap.num_blocks_in == sched.swap.num_blocks_out > 0
    assert any(o.metrics.num_preemptions for o in outs)
    for i, (a, b) in enumerate(zip(never, outs)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, f"prompt {i} (preempted {b.metrics.num_preemptions}x)"
