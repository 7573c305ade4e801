"""Adaptive speculation through the real engine core on a fake clock (no model).

A cost-model executor stands in for the model: each request's "true" next token follows a
period of 5 with pseudo-random noise at a tenth of the positions, so n-gram drafts are
often right (about 80% at the first draft position); a step of n tokens costs 5 ms + 1 ms * n.  The engine's
online step-time model and acceptance estimates then decide: at batch 1 a draft is worth
far more than its millisecond, so requests speculate; at batch 64 a step already emits
0.93 tokens per ms and a draft accepted 80% of the time adds less, so adaptive speculation
turns itself off (after measuring), and at that load it is as fast as no speculation
while fixed-k speculation is slower.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from kvserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from kvserve.engine.engine_core import EngineCore
from kvserve.protocol import ModelRunnerOutput, SampledToken, SchedulerOutput
from kvserve.sampling_params import SamplingParams
from kvserve.spec_decode.config import SpeculativeConfig

VOCAB = 1000


def truth(request_index: int, position: int) -> int:
    if random.Random(request_index * 100_003 + position).random() < 0.1:
        return 500 + (position * 31 + request_index) % 400  # noise: no proposer guesses it
    return 10 + 5 * (request_index % 50) + position % 5


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class SpecCostModel:
    clock: FakeClock
    steps: list[tuple[int, int]] = field(default_factory=list)  # (decodes, drafts) per step

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        if step.is_empty:
            return out
        decodes = drafts = 0
        for r in step.requests:
            if not r.sample:
                continue
            i = int(r.request_id.split("#")[0])
            k = r.num_draft_tokens
            first = r.start_pos + len(r.token_ids) - k  # the position of the first emitted token
            accepted = 0
            while accepted < k and r.token_ids[1 + accepted] == truth(i, first + accepted):
                accepted += 1
            out.sampled[r.request_id] = [SampledToken(truth(i, first + j)) for j in range(accepted + 1)]
            if k:
                out.num_accepted[r.request_id] = 1 + accepted
            decodes += len(r.token_ids) == 1 + k
            drafts += k
        self.steps.append((decodes, drafts))
        self.clock.now += 0.005 + 0.001 * step.num_batched_tokens
        return out


def run(batch: int, method: str | None, adaptive: bool = True, max_tokens: int = 120) -> tuple[EngineCore, SpecCostModel, float]:
    clock = FakeClock()
    executor = SpecCostModel(clock)
    config = EngineConfig(
        model=ModelConfig(model="cost-model"), cache=CacheConfig(block_size=16, num_kv_blocks=4096),
        scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=4096, max_model_len=4096),
        speculative=SpeculativeConfig(method=method, num_speculative_tokens=4, adaptive=adaptive))
    core = EngineCore(config, executor, num_kv_blocks=4096, vocab_size=VOCAB, clock=clock)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = {}
    for i in range(batch):
        prompt = [truth(i, p) for p in range(20)]
        core.add_request(core.make_request(str(i), prompt, sp))
    while core.has_unfinished():
        for req in core.step():
            outputs[req.request_id] = req.output_token_ids
    for i in range(batch):  # speculation never changes what is generated
        assert outputs[str(i)] == [truth(i, p) for p in range(20, 20 + max_tokens)]
    return core, executor, clock.now


def test_adaptive_speculates_at_batch_1():
    core, ex, t_adaptive = run(1, "ngram")
    _, _, t_off = run(1, None)
    decode_steps = [(d, k) for d, k in ex.steps if d]
    assert sum(k for _, k in decode_steps) > len(decode_steps)  # more than one draft per step on average
    assert len(decode_steps) < 0.6 * 120 and t_adaptive < 0.75 * t_off
    m = core.scheduler.spec.metrics
    assert 0.4 < m.acceptance_rate < 0.95


def test_adaptive_turns_itself_off_at_batch_64():
    core, ex, t_adaptive = run(64, "ngram")
    _, _, t_off = run(64, None)
    _, _, t_fixed = run(64, "ngram", adaptive=False)
    decode_steps = [(d, k) for d, k in ex.steps if d]
    late = decode_steps[len(decode_steps) // 4:]
    assert sum(k for _, k in late) <= 0.02 * sum(d for d, _ in late)  # (almost) no drafts once measured
    assert t_adaptive <= 1.03 * t_off  # within 3% of no speculation
    assert t_fixed > 1.05 * t_off  # while always drafting K would be slower


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_fixed_k_drafts_every_decode_it_can(method):
    _, ex, _ = run(2, method, adaptive=False, max_tokens=40)
    assert sum(k for _, k in ex.steps) > 0
