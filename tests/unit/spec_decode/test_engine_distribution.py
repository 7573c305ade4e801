"""Sampled outputs with speculation keep the target distribution, through the real engine
(scheduler, model runner, sampler processing, rejection sampling) on a tiny model with a
vocabulary of 8: the joint distribution of the first three tokens of 2,000 requests passes
a chi-square test against the model's exact probabilities (from HF transformers).  A verifier that draws the token after
a rejection from p instead of the residual fails it (p ~ 1e-60 at 3,000 requests)."""
from __future__ import annotations

import itertools

import pytest
import torch

from kvserve import LLM, SamplingParams
from tests.helpers.tiny_models import build_tiny_model
from tests.unit.spec_decode.test_rejection import chi_square_pvalue_joint

V = 8
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]  # repeats: the n-gram proposer drafts at every decode
N = 2000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("qwen3", tmp_path_factory.mktemp("v8"), seed=3, std=0.3, overrides={"vocab_size": V})


def exact_joint(model_dir, temperature: float) -> torch.Tensor:
    """P(t1, t2, t3 | PROMPT) [V, V, V] from HF."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    seqs = torch.tensor([PROMPT + [a, b] for a, b in itertools.product(range(V), range(V))])
    with torch.no_grad():
        probs = (model(seqs).logits.float() / temperature).softmax(-1)  # [V*V, L+2, V]
    L = len(PROMPT)
    p1 = probs[0, L - 1]  # [V]
    p2 = probs[::V, L].reshape(V, V)  # rows: t1 (the sequences with b == 0)
    p3 = probs[:, L + 1].reshape(V, V, V)  # [t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


def test_sampled_outputs_with_speculation_match_the_target_distribution(model_dir):
    temperature = 1.0
    sp = SamplingParams(temperature=temperature, max_tokens=4, ignore_eos=True)
    with LLM(str(model_dir), speculative_method="ngram", num_speculative_tokens=3, speculative_adaptive=False,
             max_num_seqs=512, num_kv_blocks=2048, block_size=4, seed=5) as llm:
        outs = llm.generate([{"prompt_token_ids": PROMPT}] * N, sp, use_tqdm=False)
        m = llm.engine.core.scheduler.spec.metrics
    samples = torch.tensor([o.outputs[0].token_ids[:3] for o in outs])
    # Drafts were verified, and both outcomes (accepted, rejected) happened hundreds of times.
    assert m.num_accepted_tokens > 100 and m.num_draft_tokens - m.num_accepted_tokens > 1000
    P = exact_joint(model_dir, temperature)
    assert chi_square_pvalue_joint(samples, P) > 1e-3
