"""Speculative decoding through the engine (LLM -> scheduler -> model runner) on tiny random models.

Greedy outputs with speculation on equal kvserve without speculation token for token and
HF transformers (near-tie rule), for every proposer: n-gram, suffix, a draft model (a small
random one of the same vocabulary, and the target itself, which accepts everything) and an
oracle that proposes the true continuation with random corruptions (every accepted length,
every rollback).  The same with chunked prefill in mixed batches, preemption, prefix
caching, n > 1, logprobs, penalties / min_tokens and stop strings.  KV integrity is checked
after every step.
"""
from __future__ import annotations

import pytest
import torch

from kvserve import SamplingParams
from tests.helpers.tiny_models import build_tiny_model, compare_greedy, hf_greedy
from tests.unit.spec_decode.engine_helpers import oracle_spec, run_llm, tokens

PROMPTS = [
    [5, 17, 99, 3, 250, 17, 99, 3, 250, 42, 7, 5, 17, 99],  # repeats: n-gram/suffix find matches
    list(range(40, 70)) + list(range(40, 52)),
    [300, 301, 302, 303, 304, 305, 300, 301, 302],
]
NEW = 24
VOCAB = 512
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_spec")
    target = build_tiny_model("qwen3", root / "target", seed=0)
    draft = build_tiny_model("llama-tied", root / "draft", seed=1,
                             overrides={"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64})
    return target, draft


@pytest.fixture(scope="module")
def reference(models):
    """kvserve without speculation: (outputs, full sequences)."""
    outs, _, _ = run_llm(models[0], [{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    return outs, [p + o.outputs[0].token_ids for p, o in zip(PROMPTS, outs)]


@pytest.fixture(scope="module")
def hf_reference(models):
    return hf_greedy(models[0], PROMPTS, NEW)


def _prompts(ps=PROMPTS):
    return [{"prompt_token_ids": p} for p in ps]


@pytest.mark.parametrize("method", ["ngram", "suffix", "draft", "draft-self", "oracle", "ngram-adaptive"])
def test_greedy_equals_no_speculation_and_hf(models, reference, hf_reference, method):
    target, draft = models
    ref_outs, ref_seqs = reference
    kw: dict = {}
    if method == "oracle":
        kw["spec"] = oracle_spec(ref_seqs, error=0.3, vocab_size=VOCAB)
    elif method == "draft":
        kw["method"] = f"draft:{draft}"
    elif method == "draft-self":
        kw["method"] = f"draft:{target}"  # the target as its own draft: every draft is accepted
    else:
        kw["method"] = method.split("-")[0]
        kw["adaptive"] = method.endswith("adaptive")
    params = GREEDY
    if method.endswith("adaptive"):
        # An offline batch of requests with equal tokens left drafts only when all of them
        # are likely to gain (a closed batch: adaptive.choose_joint_length); with different
        # max_tokens the longest drafts alone, beside the others' plain decodes.
        params = [SamplingParams(temperature=0, max_tokens=NEW - 6 * i, ignore_eos=True, logprobs=5)
                  for i in range(len(PROMPTS))]
    outs, core, rec = run_llm(target, _prompts(), params, **kw)
    assert tokens(outs) == [[c[:len(o.outputs[0].token_ids)] for c in r] for r, o in zip(tokens(ref_outs), outs)]
    for (hf_toks, hf_lp), o in zip(hf_reference, outs):
        ours = o.outputs[0]
        ok, pos = compare_greedy(hf_toks[:len(ours.token_ids)], hf_lp, ours.token_ids,
                                 [{t: lp.logprob for t, lp in d.items()} for d in ours.logprobs])
        assert ok, f"diverged from HF at {pos}"
    m = core.scheduler.spec.metrics
    assert m.num_draft_tokens > 0 and any(d for s in rec.steps for _, _, d, _ in s.requests)
    if method in ("draft-self", "oracle"):
        assert rec.max_accepted >= 4  # several drafts accepted in one step
    if method == "draft-self":
        assert m.num_accepted_tokens == m.num_draft_tokens
    # Fewer target steps than tokens: speculation did emit several tokens per step.
    if method in ("draft-self", "oracle"):
        assert len(rec.steps) < NEW
    assert core.kv_manager.num_free_blocks == core.kv_manager.num_blocks  # everything released


def test_mixed_batches_chunked_prefill_and_preemption(models):
    """Small step budget and KV pool: drafts share steps with prefill chunks; requests are
    preempted and recomputed; outputs still equal no speculation."""
    target, _ = models
    prompts = [list(range(10 + 7 * i, 10 + 7 * i + 18 + 5 * i)) + [3, 4, 5] for i in range(6)]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    kw = dict(max_num_batched_tokens=24, num_kv_blocks=40)
    ref, ref_core, _ = run_llm(target, _prompts(prompts), sp, **kw)
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, ref)]
    outs, core, rec = run_llm(target, _prompts(prompts), sp, spec=oracle_spec(seqs, 0.25, VOCAB), **kw)
    assert tokens(outs) == tokens(ref)
    assert rec.mixed_steps > 0, "no step verified drafts next to a prefill chunk"
    assert core.scheduler.num_preemptions > 0
    assert all(sum(n for _, n, _, _ in s.requests) <= 24 for s in rec.steps)


def test_one_lm_head_call_per_step_with_drafting_and_plain_requests(models, reference):
    """A step holding drafting and non-drafting requests scores all of them in one LM-head call
    (each call streams the whole head from memory), and outputs still equal no speculation."""
    target, _ = models
    ref_outs, ref_seqs = reference
    # The oracle knows only the first prompt's continuation: the other two never draft.
    spec = oracle_spec(ref_seqs[:1], error=0.3, vocab_size=VOCAB)
    calls: list[int] = []

    def count_head_calls(core) -> None:
        model = core.executor.inner.model
        head = model.compute_logits

        def counted(hidden: torch.Tensor) -> torch.Tensor:
            calls.append(hidden.shape[0])
            return head(hidden)

        model.compute_logits = counted

    outs, _, rec = run_llm(target, _prompts(), GREEDY, spec=spec, prepare=count_head_calls)
    assert tokens(outs) == tokens(ref_outs)
    both = [s for s in rec.steps if any(d for _, _, d, _ in s.requests)
            and any(d == 0 and sample for _, _, d, sample in s.requests)]
    assert both, "no step held a drafting and a non-drafting request"
    sampling_steps = [s for s in rec.steps if any(sample for _, _, _, sample in s.requests)]
    assert len(calls) == len(sampling_steps)  # one call per step, not one more for the drafters
    rows = sorted(calls)[-1]
    assert rows == max(sum(d + 1 for _, _, d, sample in s.requests if sample) for s in rec.steps)


def test_prefix_cache_holds_only_committed_kv(models, reference):
    """Every block the prefix cache registers holds the same KV as without speculation
    (rejected drafts' KV never enters it); a follow-up request hits it and matches."""
    target, _ = models
    ref_outs, ref_seqs = reference
    kw = dict(enable_prefix_caching=True)
    _, off_core, _ = run_llm(target, _prompts(), GREEDY, **kw)
    _, on_core, _ = run_llm(target, _prompts(), GREEDY, spec=oracle_spec(ref_seqs, 0.5, VOCAB), **kw)
    off_cached = off_core.kv_manager.pool.cached
    on_cached = on_core.kv_manager.pool.cached
    assert set(on_cached) == set(off_cached) and on_cached
    off_kv, on_kv = off_core.executor.kv_caches, on_core.executor.kv_caches
    for h, block in on_cached.items():
        other = off_cached[h].block_id
        for a, b in zip(on_kv, off_kv):
            assert torch.allclose(a[:, block.block_id], b[:, other], atol=1e-5), "cached block KV differs"
    # Follow-ups whose prompts extend the first sequences: they hit the cache, outputs agree.
    follow = [s[:len(s) - 3] for s in ref_seqs]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    off, _, _ = run_llm(target, _prompts(follow), sp)
    with_cache, core, _ = run_llm(target, _prompts(ref_seqs[:1] + follow), sp, spec=oracle_spec(ref_seqs, 0.5, VOCAB))
    assert tokens(with_cache[1:]) == tokens(off)


def test_n_greater_than_one_logprobs_and_penalties(models):
    target, _ = models
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, n=3, logprobs=3,
                        repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    off, _, _ = run_llm(target, _prompts(), sp)
    seqs = [p + o.outputs[0].token_ids for p, o in zip(PROMPTS, off)]
    on, core, rec = run_llm(target, _prompts(), sp, spec=oracle_spec(seqs, 0.3, VOCAB))
    assert tokens(on) == tokens(off)
    assert rec.max_accepted >= 3
    for a, b in zip(on, off):
        for ca, cb in zip(a.outputs, b.outputs):
            assert len(ca.logprobs) == len(cb.logprobs) == 16
            for da, db in zip(ca.logprobs, cb.logprobs):
                assert da.keys() == db.keys()
                for t in da:
                    assert abs(da[t].logprob - db[t].logprob) < 1e-4


def test_min_tokens_and_stop_token_ids(models, reference):
    """min_tokens masks stop tokens per position, by the position's output index (drafts
    count as output); a stop token inside the accepted drafts ends the request there."""
    target, _ = models
    ref_outs, ref_seqs = reference
    out0 = ref_outs[0].outputs[0].token_ids
    # The first new token of out0 at an index i that a verification covers as a draft (with
    # every draft right and k = 4, steps start at output lengths 1, 6, 11, ...): the
    # unconstrained run stops there.
    i = next(j for j in range(7, NEW) if out0[j] not in out0[:j] and (j - 1) % 5)
    cases = [
        # The oracle proposes out0, whose index 2 is the stop token but must be masked (< min_tokens).
        (SamplingParams(temperature=0, max_tokens=NEW, min_tokens=6, stop_token_ids=[out0[2]]), ref_seqs),
        # Stop exactly at min_tokens = i: a verification that starts below i must not mask it at i.
        (SamplingParams(temperature=0, max_tokens=NEW, min_tokens=i, stop_token_ids=[out0[i]]), None),
        (SamplingParams(temperature=0, max_tokens=NEW, stop_token_ids=[out0[12]]), None),
    ]
    for sp, refs in cases:
        off, _, _ = run_llm(target, _prompts(), sp)
        if refs is None:
            refs = [p + o.outputs[0].token_ids for p, o in zip(PROMPTS, off)]
        on, _, rec = run_llm(target, _prompts(), sp, spec=oracle_spec(refs, 0.0, VOCAB))
        assert tokens(on) == tokens(off)
        assert [o.outputs[0].finish_reason for o in on] == [o.outputs[0].finish_reason for o in off]
        assert rec.max_accepted >= 3
    assert off[0].outputs[0].finish_reason == "stop" and len(off[0].outputs[0].token_ids) == 13
    assert on[0].outputs[0].token_ids == out0[:13]


def test_max_tokens_and_max_model_len_bound_the_drafts(models, reference):
    target, _ = models
    _, ref_seqs = reference
    sp = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    off, _, _ = run_llm(target, _prompts(), sp, max_model_len=48)
    on, core, rec = run_llm(target, _prompts(), sp, spec=oracle_spec(ref_seqs, 0.0, VOCAB), max_model_len=48)
    assert tokens(on) == tokens(off) and all(len(o.outputs[0].token_ids) <= 7 for o in on)
    # PROMPTS[1] has 42 tokens: at most 6 more fit in 48 positions.
    assert len(on[1].outputs[0].token_ids) == len(off[1].outputs[0].token_ids) == 6


def test_seeded_sampling_with_speculation_is_reproducible(models, reference):
    target, _ = models
    _, ref_seqs = reference
    sp = SamplingParams(temperature=0.8, top_k=20, max_tokens=16, ignore_eos=True, seed=11, n=2)
    a, _, _ = run_llm(target, _prompts(), sp, method="ngram")
    b, _, _ = run_llm(target, _prompts(), sp, method="ngram")
    assert tokens(a) == tokens(b)
    assert all(len(c.token_ids) == 16 and all(0 <= t < VOCAB for t in c.token_ids) for o in a for c in o.outputs)


def test_draft_vocabulary_larger_than_the_target_is_refused(models, tmp_path):
    from kvserve import LLM

    target, _ = models
    big = build_tiny_model("llama-tied", tmp_path / "big", overrides={"vocab_size": 1024, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(str(target), speculative_method=f"draft:{big}", num_kv_blocks=64)


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_drafts_and_acceptance_equal_the_reference_loop(models, method):
    """With fixed k and nothing limiting the drafts, the engine proposes and accepts exactly what
    the one-request reference loop (kvserve.spec_decode.reference) does for each request, once
    the first token is out (the loop also drafts in its first step, the engine only for decodes)."""
    from kvserve.spec_decode import make_proposer
    from kvserve.spec_decode.dense_runner import DenseModelRunner
    from kvserve.spec_decode.metrics import SpecDecodeMetrics
    from kvserve.spec_decode.reference import speculative_generate

    target, _ = models
    runner = DenseModelRunner.load(target)
    expected = SpecDecodeMetrics()
    ref_tokens = []
    for p in PROMPTS:
        first = speculative_generate(runner, None, p, 1).token_ids
        res = speculative_generate(runner, make_proposer(method), p + first, NEW - 1, num_spec_tokens=4)
        expected.merge(res.metrics)
        ref_tokens.append([first + res.token_ids])
    outs, core, _ = run_llm(target, _prompts(), GREEDY, method=method)
    assert tokens(outs) == ref_tokens
    assert core.scheduler.spec.metrics.as_dict() == expected.as_dict()
