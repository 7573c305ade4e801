"""Preemption by swap (CPU host buffer) against recompute, greedy, tiny random model: a request
resumed from its swapped blocks produces exactly the tokens of a run where it was never
preempted, in the cases tests/parity/test_policies_parity.py does not reach:

* preempted in the middle of a chunked prefill (its last block partly written), with the
  prefix cache off (every block copied back) and on (leading blocks still cached are shared,
  only the rest copied in);
* displaced by the `fair` policy (cause "policy") rather than for lack of blocks;
* and recompute on the same schedule reaches the same tokens (within the near-tie rule:
  recomputing a context batches it differently, which may flip a near tie; swap may not).
"""
from __future__ import annotations

from typing import Any

import pytest

from kvserve import LLM, SamplingParams
from kvserve.core.scheduler import Scheduler
from tests.helpers.tiny_models import build_tiny_model, compare_greedy
from tests.parity.test_parity_hf import make_prompts

MAX_NEW = 8
# 12 blocks of 16 tokens for prompts up to 129 tokens, 16 tokens per step: long prompts are
# chunked and preempted part-way.
SMALL = {"num_kv_blocks": 12, "max_num_batched_tokens": 16, "swap_space": 0.01}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("llama3", tmp_path_factory.mktemp("swap_resume"))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return make_prompts()[2:9]  # 15..129 tokens (one to nine blocks)


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)


def _generate(model_dir, prompts, monkeypatch=None, tenant: Any = None, **kw):
    """Outputs, the scheduler, and per preemption (request id, tokens computed, prompt length)."""
    seen: list[tuple[str, int, int]] = []
    if monkeypatch is not None:
        original = Scheduler._preempt

        def record(self, request, out, cause="kv_blocks"):
            seen.append((request.request_id, request.num_computed_tokens, request.num_prompt_tokens))
            return original(self, request, out, cause)

        monkeypatch.setattr(Scheduler, "_preempt", record)
    llm = LLM(str(model_dir), **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _params(), use_tqdm=False, tenant=tenant)
    core = llm.engine.core
    core.kv_manager.check_integrity()
    assert core.kv_manager.num_free_blocks == core.kv_manager.num_blocks
    if core.scheduler.swap is not None:
        core.scheduler.swap.check_integrity()
    return outs, core.scheduler, seen


@pytest.fixture(scope="module")
def never(model_dir, prompts):
    outs, sched, _ = _generate(model_dir, prompts, enable_prefix_caching=False)
    assert sched.num_preemptions == 0
    return outs


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_swap_resumes_mid_prefill_to_the_tokens_never_preempted(model_dir, prompts, never, monkeypatch,
                                                                prefix_caching):
    outs, sched, seen = _generate(model_dir, prompts, monkeypatch, preemption_mode="swap",
                                  enable_prefix_caching=prefix_caching, **SMALL)
    assert sched.preemptions_by.get(("kv_blocks", "swap"), 0) > 0
    assert sched.swap is not None and sched.swap.num_blocks_in > 0
    if not prefix_caching:
        assert sched.swap.num_blocks_in == sched.swap.num_blocks_out  # nothing shared: all back
    # Some victim was mid-prefill with a partly written last block.
    assert any(0 < done < plen and done % 16 for _, done, plen in seen), seen
    for i, (a, b) in enumerate(zip(never, outs)):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids, f"prompt {i} ({b.metrics.num_preemptions}x)"
    assert sum(o.metrics.num_preemptions for o in outs) == sched.num_preemptions


def test_recompute_on_the_same_schedule_reaches_the_same_tokens(model_dir, prompts, never):
    outs, sched, _ = _generate(model_dir, prompts, preemption_mode="recompute", enable_prefix_caching=False,
                               **SMALL)
    assert sched.preemptions_by.get(("kv_blocks", "recompute"), 0) > 0
    exact = 0
    for i, (a, b) in enumerate(zip(never, outs)):
        ref_lps = [_dense(d) for d in a.outputs[0].logprobs]
        ours = [{t: lp.logprob for t, lp in d.items()} for d in b.outputs[0].logprobs]
        ok, pos = compare_greedy(a.outputs[0].token_ids, ref_lps, b.outputs[0].token_ids, ours)
        assert ok, f"prompt {i}: diverged at {pos}"
        exact += pos == -1
    assert exact >= len(prompts) - 1


def test_a_fair_displacement_by_swap_resumes_to_the_same_tokens(model_dir, prompts, never):
    """Two seats.  Tenant a's requests fill both; tenant b's arrive a few steps later, a whole
    seat below its share, and take a seat from a (displacement, cause "policy"): the displaced
    request is swapped out and back."""
    llm = LLM(str(model_dir), scheduling_policy="fair", preemption_mode="swap", max_num_seqs=2,
              enable_prefix_caching=False, max_num_batched_tokens=64, swap_space=0.01)
    engine = llm.engine
    done: dict[str, Any] = {}

    def step() -> None:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out

    for i, p in enumerate(prompts[:4]):
        engine.add_request({"prompt_token_ids": p}, _params(), request_id=str(i), tenant="a")
    for _ in range(3):
        step()
    for i, p in enumerate(prompts[4:], start=4):
        engine.add_request({"prompt_token_ids": p}, _params(), request_id=str(i), tenant="b")
    while engine.has_unfinished_requests():
        step()
    sched = engine.core.scheduler
    assert sched.preemptions_by.get(("policy", "swap"), 0) > 0, sched.preemptions_by
    assert sched.swap is not None and sched.swap.num_blocks_in == sched.swap.num_blocks_out > 0
    for i, a in enumerate(never):
        b = done[str(i)]
        assert b.outputs[0].token_ids == a.outputs[0].token_ids, f"prompt {i} ({b.metrics.num_preemptions}x)"


def _dense(top: dict) -> Any:
    """A top-k logprob dict as a dense vector (-inf elsewhere), as compare_greedy reads HF's."""
    import torch

    v = torch.full((max(top) + 1,), float("-inf"))
    for t, lp in top.items():
        v[t] = lp.logprob
    return v
