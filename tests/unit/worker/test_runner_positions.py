"""The model runner takes each request's positions from the step (not from start_pos)."""
from __future__ import annotations

import pytest
import torch

from kvserve.models.llama import LlamaForCausalLM
from kvserve.models.model_config import ModelArchConfig
from kvserve.protocol import ScheduledRequest, SchedulerOutput
from kvserve.sampling_params import SamplingParams
from kvserve.worker.model_runner import ModelRunner

CFG = ModelArchConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6,
                      rope_theta=10000.0, rope_scaling=None, max_position_embeddings=128,
                      tie_word_embeddings=False, attention_bias=False, qk_norm=False)
PROMPT = [5, 9, 13, 2, 40, 33, 7, 7, 61, 18]
GREEDY = SamplingParams(temperature=0.0, logprobs=5)


def runner() -> ModelRunner:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CFG, 128).eval()
    return ModelRunner(model, CFG, num_blocks=8, block_size=4, dtype=torch.float32, device=torch.device("cpu"),
                       eos_token_ids=frozenset(), attention_backend="torch")


def step(tokens: list[int], positions, start: int, sample: bool) -> SchedulerOutput:
    sr = ScheduledRequest(request_id="r", token_ids=tokens, positions=positions, start_pos=start, block_ids=[3, 1, 6],
                          sample=sample, sampling_params=GREEDY, prompt_token_ids=PROMPT, output_token_ids=[],
                          generator_key=("r", 0), prompt_logprobs=False)
    return SchedulerOutput(requests=[sr], num_batched_tokens=len(tokens))


def test_explicit_position_lists_match_ranges_and_chunks():
    whole = runner().execute(step(PROMPT, range(0, 10), 0, True)).sampled["r"][0]
    as_list = runner().execute(step(PROMPT, list(range(10)), 0, True)).sampled["r"][0]
    assert as_list.token_id == whole.token_id and as_list.logprobs == whole.logprobs
    r = runner()
    assert r.execute(step(PROMPT[:6], [0, 1, 2, 3, 4, 5], 0, False)).sampled == {}
    chunked = r.execute(step(PROMPT[6:], [6, 7, 8, 9], 6, True)).sampled["r"][0]
    assert chunked.token_id == whole.token_id
    for tid, lp in whole.logprobs.items():
        assert abs(chunked.logprobs[tid] - lp) < 1e-4


def test_positions_change_the_result():
    """A step shifted to other positions computes something else: the positions are used."""
    r = runner()
    base = r.execute(step(PROMPT, range(0, 10), 0, True)).sampled["r"][0].logprobs
    r2 = runner()
    r2.execute(step(PROMPT[:1], [0], 0, False))  # position 0 filled, then the prompt from position 1
    shifted = r2.execute(step(PROMPT, range(1, 11), 1, True)).sampled["r"][0].logprobs
    assert shifted != base


@pytest.mark.parametrize("positions, start", [([0, 1, 2, 5, 6, 7, 8, 9, 10, 11], 0), (range(0, 10), 2),
                                              (range(0, 9), 0)])
def test_positions_the_runner_cannot_compute_are_refused(positions, start):
    with pytest.raises(ValueError, match="contiguous positions"):
        runner().execute(step(PROMPT, positions, start, True))
