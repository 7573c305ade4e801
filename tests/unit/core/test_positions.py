"""Steps name their positions explicitly, and num_computed_tokens is committed from the
executor's output (the positions it accepted), not when the step is scheduled."""
from __future__ import annotations

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.scheduler import Scheduler
from kvserve.protocol import ModelRunnerOutput, SampledToken
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams

BS = 4


def make(budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=64),
                     KVCacheManager(16, BS))


def test_positions_are_explicit_and_commit_waits_for_the_output():
    s = make(budget=6)
    r = Request("r", list(range(10)), SamplingParams(max_tokens=3), block_size=BS)
    s.add_request(r)
    out = s.schedule()
    (sr,) = out.requests
    assert list(sr.positions) == [0, 1, 2, 3, 4, 5] and sr.start_pos == 0
    assert r.num_computed_tokens == 0  # scheduled, not committed
    s.update_from_output(out, ModelRunnerOutput())
    assert r.num_computed_tokens == 6
    out = s.schedule()
    (sr,) = out.requests
    assert list(sr.positions) == [6, 7, 8, 9] and sr.sample
    s.update_from_output(out, ModelRunnerOutput(sampled={"r": [SampledToken(42)]}))
    assert r.num_computed_tokens == 10 and r.output_token_ids == [42]
    out = s.schedule()
    assert list(out.requests[0].positions) == [10]  # the decode of token 42


def test_rejected_positions_roll_back_and_are_scheduled_again():
    s = make()
    r = Request("r", list(range(10)), SamplingParams(max_tokens=3), block_size=BS)
    s.add_request(r)
    out = s.schedule()
    blocks = s.kv.block_ids("r")
    # The executor kept the KV of only the first 6 positions (as a verifier does when it
    # rejects drafts): nothing is sampled and the rest is computed again.
    s.update_from_output(out, ModelRunnerOutput(num_accepted={"r": 6}))
    assert r.num_computed_tokens == 6 and r.output_token_ids == []
    s.kv.check_integrity()
    out = s.schedule()
    (sr,) = out.requests
    assert list(sr.positions) == [6, 7, 8, 9] and sr.token_ids == [6, 7, 8, 9] and sr.sample
    assert s.kv.block_ids("r") == blocks  # the blocks already allocated cover them: none added
    s.update_from_output(out, ModelRunnerOutput(sampled={"r": [SampledToken(5)]}))
    assert r.num_computed_tokens == 10 and r.output_token_ids == [5]
    s.kv.check_integrity()
