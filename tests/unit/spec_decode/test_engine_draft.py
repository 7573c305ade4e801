"""The draft model in the engine: batched on its own paged KV pool (paged_draft.py).

Through the real engine (LLM -> scheduler -> model runner), with `draft:PATH` the drafts of
every step are exactly those of the dense reference proposer (DraftModelProposer, one request
at a time on a dense cache) injected in the same engine, through mixed batches, preemption and
rollbacks; greedy outputs equal no speculation token for token, also with n > 1; the draft's
blocks are released on preemption, abort and finish, and its pool stays consistent after every
step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from kvserve import LLM, SamplingParams
from kvserve.spec_decode.adaptive import SpecLengthPolicy
from kvserve.spec_decode.draft_model import DraftModelProposer
from kvserve.spec_decode.manager import SpecDecodeManager
from kvserve.spec_decode.paged_draft import PagedDraftProposer
from kvserve.spec_decode.scheduling import SpecScheduling
from tests.helpers.tiny_models import build_tiny_model
from tests.unit.spec_decode.engine_helpers import run_llm, tokens

PROMPTS = [list(range(10 + 7 * i, 10 + 7 * i + 18 + 5 * i)) + [3, 4, 5] for i in range(6)]
SP = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
# Small step budget and pool: drafts share steps with prefill chunks, requests are preempted.
TIGHT = dict(max_num_batched_tokens=24, num_kv_blocks=40)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_draft")
    target = build_tiny_model("qwen3", root / "target", seed=0)
    # Trained-looking agreement is not needed: a random draft gives every accepted length.
    draft = build_tiny_model("llama-tied", root / "draft", seed=1,
                             overrides={"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64})
    return target, draft


@dataclass
class DraftLog:
    """Wraps the executor: the drafts of every step, and the draft pool checked after it."""

    inner: Any
    proposer: Any
    drafts: list[list[tuple[str, tuple[int, ...]]]] = field(default_factory=list)

    def execute(self, step: Any) -> Any:
        self.drafts.append([(r.request_id, tuple(r.token_ids[1:])) for r in step.requests if r.num_draft_tokens])
        if isinstance(self.proposer, PagedDraftProposer):
            self.proposer.check_integrity()
        return self.inner.execute(step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def run_draft(target, prompts, sp, spec_or_method, **kw):
    """Generate with a draft proposer (a method string, or an injected SpecScheduling), logging drafts."""
    opts: dict[str, Any] = dict(block_size=4, num_speculative_tokens=4, speculative_adaptive=False, **kw)
    if isinstance(spec_or_method, str):
        opts["speculative_method"] = spec_or_method
    with LLM(str(target), **opts) as llm:
        core = llm.engine.core
        if not isinstance(spec_or_method, str):
            core.scheduler.spec = spec_or_method
        log = DraftLog(core.executor, core.scheduler.spec.manager.proposer)
        core.executor = log
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return outs, core, log


def dense_spec(draft) -> SpecScheduling:
    return SpecScheduling(SpecDecodeManager(DraftModelProposer.load(draft), SpecLengthPolicy(4, adaptive=False)))


def test_paged_drafts_equal_the_dense_reference_with_preemption(models):
    target, draft = models
    off, _, _ = run_llm(target, [{"prompt_token_ids": p} for p in PROMPTS], SP, **TIGHT)
    ref, ref_core, ref_log = run_draft(target, PROMPTS, SP, dense_spec(draft), **TIGHT)
    outs, core, log = run_draft(target, PROMPTS, SP, f"draft:{draft}", **TIGHT)
    proposer = core.scheduler.spec.manager.proposer
    assert isinstance(proposer, PagedDraftProposer)
    assert tokens(outs) == tokens(ref) == tokens(off)
    assert log.drafts == ref_log.drafts  # the same drafts for the same requests, step by step
    m = core.scheduler.spec.metrics
    assert m.as_dict() == ref_core.scheduler.spec.metrics.as_dict()
    assert 0 < m.num_accepted_tokens < m.num_draft_tokens  # acceptances and rollbacks both
    assert core.scheduler.num_preemptions > 0
    # Batched: fewer draft forwards than drafted tokens (several requests per forward).
    assert proposer.num_forwards < m.num_draft_tokens / 2
    assert proposer.pool.num_free == proposer.pool.num_blocks and not proposer.pool.tables


def test_preemption_releases_the_draft_kv(models, monkeypatch):
    target, draft = models
    released: list[tuple[str, int]] = []
    orig = SpecDecodeManager.preempted

    def spy(self, request_id):
        orig(self, request_id)
        state = self._states.get(request_id)
        if state is not None:
            released.append((request_id, len(state.cached)))
            assert state.key not in self.proposer.pool.tables

    monkeypatch.setattr(SpecDecodeManager, "preempted", spy)
    off, _, _ = run_llm(target, [{"prompt_token_ids": p} for p in PROMPTS], SP, **TIGHT)
    outs, core, _ = run_draft(target, PROMPTS, SP, f"draft:{draft}", **TIGHT)
    assert tokens(outs) == tokens(off)
    assert released and all(n == 0 for _, n in released)


def test_n_greater_than_one_greedy_equals_no_speculation(models):
    target, draft = models
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, n=3, logprobs=2)
    prompts = PROMPTS[:3]
    off, _, _ = run_llm(target, [{"prompt_token_ids": p} for p in prompts], sp)
    outs, core, log = run_draft(target, prompts, sp, f"draft:{draft}")
    assert tokens(outs) == tokens(off)
    forks = {rid for s in log.drafts for rid, _ in s}
    assert len(forks) > len(prompts), f"only {forks} drafted: the forked samples did not"
    for a, b in zip(outs, off):
        for ca, cb in zip(a.outputs, b.outputs):
            assert [sorted(d) for d in ca.logprobs] == [sorted(d) for d in cb.logprobs]


def test_sampled_with_a_seed_is_reproducible(models):
    target, draft = models
    sp = SamplingParams(temperature=0.8, top_k=20, max_tokens=16, ignore_eos=True, n=2, seed=7)
    a, _, _ = run_draft(target, PROMPTS[:2], sp, f"draft:{draft}")
    b, _, _ = run_draft(target, PROMPTS[:2], sp, f"draft:{draft}")
    assert tokens(a) == tokens(b)


def test_abort_and_finish_release_the_draft_blocks(models):
    target, draft = models
    with LLM(str(target), speculative_method=f"draft:{draft}", num_speculative_tokens=4,
             speculative_adaptive=False, block_size=4, num_kv_blocks=128) as llm:
        core = llm.engine.core
        proposer = core.scheduler.spec.manager.proposer
        sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        for i, p in enumerate(PROMPTS[:3]):
            core.add_request(core.make_request(f"q{i}", p, sp))
        for _ in range(6):
            core.step()
        assert len(proposer.pool.tables) == 3  # all three drafting, each with its own blocks
        held = proposer.pool.num_free
        core.abort("q1")
        assert len(proposer.pool.tables) == 2 and proposer.pool.num_free > held
        proposer.check_integrity()
        while core.scheduler.requests:
            core.step()
        assert proposer.pool.num_free == proposer.pool.num_blocks and not proposer.pool.tables
