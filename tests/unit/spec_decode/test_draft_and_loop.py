"""Draft-model proposer and the reference speculative loop on tiny random models.

Greedy outputs with speculation (every proposer) equal kvserve without
speculation and HF transformers; the draft proposer's drafts are the draft
model's own HF greedy continuation, also after rolling back rejected drafts.
"""
from __future__ import annotations

import copy

import pytest
import torch

from kvserve.spec_decode import make_proposer
from kvserve.spec_decode.adaptive import LinearStepTime, SpecLengthPolicy
from kvserve.spec_decode.dense_runner import DenseModelRunner
from kvserve.spec_decode.draft_model import DraftModelProposer
from kvserve.spec_decode.reference import speculative_generate
from tests.helpers.tiny_models import build_tiny_model, compare_greedy, hf_greedy

PROMPTS = [
    [5, 17, 99, 3, 250, 17, 99, 3, 250, 42, 7, 5, 17, 99],  # repeats: n-gram/suffix find matches
    list(range(40, 70)) + list(range(40, 52)),
]
NEW = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    target = build_tiny_model("qwen3", root / "target", seed=0)
    draft = build_tiny_model("llama-tied", root / "draft", seed=1,
                             overrides={"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64})
    return target, draft


@pytest.fixture(scope="module")
def target_runner(models):
    return DenseModelRunner.load(models[0])


@pytest.fixture(scope="module")
def hf_target(models):
    return hf_greedy(models[0], PROMPTS, NEW)


def test_dense_runner_chunks_equal_one_pass(target_runner):
    ids = PROMPTS[1]
    full = target_runner.extend(target_runner.new_sequence(), ids)
    seq = target_runner.new_sequence(capacity=1)  # forces the cache to grow
    parts = [target_runner.extend(seq, ids[:7]), target_runner.extend(seq, ids[7:8]), target_runner.extend(seq, ids[8:])]
    assert torch.allclose(torch.cat(parts), full, atol=1e-4)


def test_ensure_keeps_only_the_agreeing_prefix(target_runner):
    """A cache holding other tokens past position 3 is cut there, not reused."""
    a = PROMPTS[1][:12]
    b = a[:3] + [7, 8, 9, 10, 11, 12]
    seq = target_runner.new_sequence()
    target_runner.ensure(seq, a, logits_from=len(a) - 1)
    got = target_runner.ensure(seq, b, logits_from=len(b) - 1)
    fresh = target_runner.extend(target_runner.new_sequence(), b)[-1:]
    assert torch.allclose(got, fresh, atol=1e-4)
    assert seq.token_ids == b


def test_draft_proposals_are_the_draft_models_greedy_continuation(models):
    _, draft_dir = models
    proposer = DraftModelProposer.load(draft_dir)
    prompt = PROMPTS[0]
    hf_tokens, hf_lp = hf_greedy(draft_dir, [prompt], 10)[0]
    state = proposer.new_state(prompt)
    drafts = proposer.propose(state, 5)
    ok, _ = compare_greedy(hf_tokens[:5], hf_lp, drafts, None)
    assert ok and drafts == hf_tokens[:5]
    # Accept two drafts and commit a token the draft did not propose: its cache must roll back.
    other = (drafts[2] + 1) % 512
    state.append(drafts[:2] + [other])
    again = proposer.propose(state, 4)
    hf2, _ = hf_greedy(draft_dir, [prompt + drafts[:2] + [other]], 4)[0]
    assert again == hf2
    assert state.seq.token_ids == state.token_ids + again[:-1]  # committed, then the new drafts
    proposer.finish(state)
    assert state.seq.length == 0


def test_draft_vocabulary_must_fit_the_target(models):
    with pytest.raises(ValueError, match="vocabulary"):
        DraftModelProposer.load(models[1], target_vocab_size=100)
    with pytest.raises(ValueError, match="unknown speculative method"):
        make_proposer("draft:")


def noisy_copy(runner: DenseModelRunner, std: float) -> DenseModelRunner:
    """The target with perturbed weights: a draft that agrees often but not always."""
    model = copy.deepcopy(runner.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return DenseModelRunner(model, runner.cfg)


@pytest.mark.parametrize("method", ["ngram", "suffix", "draft", "self", "noisy_self"])
def test_greedy_outputs_equal_non_speculative_and_hf(method, models, target_runner, hf_target):
    target_dir, draft_dir = models
    proposer = {
        "ngram": lambda: make_proposer("ngram", min_n=1, max_n=3),
        "suffix": lambda: make_proposer("suffix", max_depth=12, max_match=6),
        "draft": lambda: make_proposer(f"draft:{draft_dir}"),
        "self": lambda: DraftModelProposer(DenseModelRunner.load(target_dir)),  # the target drafts for itself
        "noisy_self": lambda: DraftModelProposer(noisy_copy(target_runner, 0.005)),
    }[method]()
    for prompt, (hf_tokens, hf_lp) in zip(PROMPTS, hf_target):
        plain = speculative_generate(target_runner, None, prompt, NEW)
        spec = speculative_generate(target_runner, proposer, prompt, NEW, num_spec_tokens=4)
        assert spec.token_ids == plain.token_ids
        ok, pos = compare_greedy(hf_tokens, hf_lp, spec.token_ids, None)
        assert ok, (method, pos)
        assert plain.num_target_steps == NEW
        assert spec.num_target_steps == NEW - spec.metrics.num_accepted_tokens
        if method == "self":  # a perfect draft: every draft accepted
            assert spec.metrics.acceptance_rate == 1.0
            assert spec.num_target_steps == -(-NEW // 5)
        if method == "noisy_self":  # partial acceptance: accepted prefixes and rolled-back drafts
            assert 0.2 < spec.metrics.acceptance_rate < 0.8
    assert spec.metrics.num_drafts > 0


def test_speculation_on_a_copying_prompt_saves_target_steps(target_runner):
    """Random models loop; once they do, n-gram drafts are accepted (real savings, exact output)."""
    prompt = PROMPTS[0]
    plain = speculative_generate(target_runner, None, prompt, 40)
    spec = speculative_generate(target_runner, make_proposer("ngram", min_n=1, max_n=3), prompt, 40,
                                num_spec_tokens=4)
    assert spec.token_ids == plain.token_ids
    assert spec.metrics.num_accepted_tokens > 0
    assert spec.num_target_steps < plain.num_target_steps


def test_sampling_is_seeded_and_adaptive_policy_keeps_outputs(target_runner):
    prompt = PROMPTS[0]
    def run(seed, proposer):
        return speculative_generate(target_runner, proposer, prompt, 12, temperature=0.8,
                                    generator=torch.Generator().manual_seed(seed)).token_ids
    p = make_proposer("ngram", min_n=1, max_n=3)
    assert run(3, p) == run(3, p)
    assert len({tuple(run(s, p)) for s in range(4)}) > 1
    # With an adaptive policy greedy outputs stay the same.
    pol = SpecLengthPolicy(4, step_time=LinearStepTime(1.0, 0.05))
    plain = speculative_generate(target_runner, None, prompt, 20).token_ids
    assert speculative_generate(target_runner, p, prompt, 20, policy=pol).token_ids == plain


def test_eos_stops_and_budget_is_exact(target_runner):
    prompt = PROMPTS[0]
    plain = speculative_generate(target_runner, None, prompt, 16).token_ids
    eos = plain[5]
    first = plain.index(eos)
    out = speculative_generate(target_runner, make_proposer("ngram", min_n=1, max_n=3), prompt, 16,
                               eos_token_ids=[eos]).token_ids
    assert out == plain[:first + 1]
    for n in (1, 2, 7):
        assert speculative_generate(target_runner, make_proposer("suffix"), prompt, n).token_ids == plain[:n]


def test_common_prefix_equals_a_plain_scan():
    import random

    from kvserve.spec_decode.dense_runner import DenseSequence

    class Cfg:
        num_layers, num_kv_heads, head_dim = 1, 1, 2

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 12))]
        b = [rng.randrange(3) for _ in range(rng.randrange(0, 12))]
        if rng.random() < 0.5:
            b = a[:rng.randrange(0, len(a) + 1)] + b
        seq = DenseSequence(Cfg, torch.float32, torch.device("cpu"), 1)  # type: ignore[arg-type]
        seq.token_ids = list(a)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert seq.common_prefix(b) == n
