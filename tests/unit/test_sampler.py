"""Sampling options against independent computations."""
from __future__ import annotations

import math

import pytest
import torch

from kvserve.sampling_params import SamplingParams
from kvserve.worker.sampler import Sampler, SamplingRow, apply_penalties, truncate


def row(prompt=(), output=(), gen=None, stop=frozenset(), **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), list(prompt), list(output), gen, stop)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, -1.0, 4.9]])
    out = Sampler()(logits, [row(temperature=0), row(temperature=0)])
    assert out.token_ids == [1, 0]


def test_top_k_top_p_min_p_keep_exactly_the_expected_sets():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    def kept(**kw):
        p = truncate(logits.clone(), [row(**kw)])[0]
        return set(torch.nonzero(p > 0).flatten().tolist()), p
    assert kept(top_k=2)[0] == {0, 1}
    # top_p=0.65: 0.4 < 0.65 keeps token 1; mass before token 2 is 0.7 >= 0.65 drops it.
    assert kept(top_p=0.65)[0] == {0, 1}
    assert kept(top_p=0.71)[0] == {0, 1, 2}
    # min_p=0.45: threshold 0.18, tokens with p >= 0.18 stay.
    s, p = kept(min_p=0.45)
    assert s == {0, 1, 2}
    assert torch.allclose(p[:3], torch.tensor([0.4, 0.3, 0.2]) / 0.9)


def test_temperature_scales_distribution():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    p = truncate(logits.clone(), [row(temperature=0.5)])[0]
    expected = torch.softmax(torch.tensor([2.0, 4.0, 6.0]), -1)
    assert torch.allclose(p, expected, atol=1e-6)


def test_penalties_match_the_formulas():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    r = row(prompt=[0], output=[1, 2, 2], repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, [r])
    # token 0: prompt only -> repetition: 2/2 = 1
    # token 1: output once -> -2*2 = -4, then -0.25*1 - 0.5 = -4.75
    # token 2: output twice -> 1/2 = 0.5, then -0.25*2 - 0.5 = -0.5
    # token 3: untouched
    assert torch.allclose(logits, torch.tensor([[1.0, -4.75, -0.5, 0.5]]))


def test_min_tokens_masks_eos_until_reached():
    logits = torch.tensor([[0.0, 10.0, 0.0]])
    s = Sampler()
    assert s(logits, [row(output=[], stop=frozenset({1}), min_tokens=1, temperature=0)]).token_ids == [2] or \
        s(logits, [row(output=[], stop=frozenset({1}), min_tokens=1, temperature=0)]).token_ids == [0]
    assert s(logits, [row(output=[5], stop=frozenset({1}), min_tokens=1, temperature=0)]).token_ids == [1]


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    s = Sampler(seed=1)
    toks = torch.tensor(s(logits, [row(temperature=1.0) for _ in range(4000)]).token_ids)
    freq = torch.bincount(toks, minlength=4).float() / 4000
    # 4 standard errors of a binomial proportion
    tol = 4 * torch.sqrt(probs * (1 - probs) / 4000)
    assert torch.all((freq - probs).abs() < tol), freq


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(1, 50)
    def draw_with(batch_extra: int) -> list[int]:
        g = torch.Generator().manual_seed(1234)
        toks = []
        for _ in range(10):
            rows = [row(temperature=1.0)] * batch_extra + [row(temperature=1.0, gen=g)]
            batch = torch.cat([torch.randn(batch_extra, 50), logits]) if batch_extra else logits
            toks.append(Sampler(seed=batch_extra)(batch, rows).token_ids[-1])
        return toks
    assert draw_with(0) == draw_with(3) == draw_with(7)


def test_logprobs_are_raw_log_softmax_with_topk_and_chosen():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    out = Sampler()(logits, [row(temperature=0, logprobs=2, repetition_penalty=1.5, output=[2])])
    lsm = torch.log_softmax(logits, -1)[0]
    d = out.logprobs[0]
    assert set(d) >= {2, 1}
    for t, lp in d.items():
        assert math.isclose(lp, lsm[t].item(), rel_tol=1e-6)


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("max_tokens", 0),
    ("min_tokens", -1), ("logprobs", 21), ("prompt_logprobs", -1), ("stop_token_ids", [-1]), ("stop", [""]),
])
def test_invalid_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)
