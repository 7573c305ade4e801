"""The core (scheduler, KV manager, KV sources, policies) imports and runs without torch.

A child interpreter installs a meta-path finder that refuses `torch`, then
drives the real scheduler through a few steps (prefix hit, preemption, an
offload tier, a policy swap) and prints what it saw; the parent checks it.
"""
from __future__ import annotations

import json

from tests.helpers.torch_blocked import run_without_torch

CHILD = """
    import json, sys

    from kvserve.config import SchedulerConfig
    from kvserve.core.kv_cache_manager import KVCacheManager
    from kvserve.core.kv_offload import KVOffloadManager, TierEvents
    from kvserve.core.policies import POLICIES, make_policy
    from kvserve.core.scheduler import Scheduler
    from kvserve.protocol import ModelRunnerOutput, SampledToken
    from kvserve.request import Request
    from kvserve.sampling_params import SamplingParams

    class Tier:
        def lookup(self, hashes): return 0
        def submit_load(self, rid, hashes): pass
        def poll(self): return TierEvents()
        def cancel_load(self, rid): pass

    report = {}
    for policy in sorted(POLICIES):
        kv = KVCacheManager(num_blocks=7, block_size=4)
        s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, policy=policy),
                      kv, offload=KVOffloadManager(Tier(), 4), clock=lambda: 0.0)
        for i in range(3):
            s.add_request(Request(f"r{i}", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10 + i], SamplingParams(max_tokens=6),
                                  arrival_time=float(i), block_size=4))
        steps = 0
        while s.has_unfinished():
            out = s.schedule()
            kv.check_integrity()
            assert out.num_batched_tokens <= 16
            s.update_from_output(out, ModelRunnerOutput(
                sampled={r.request_id: [SampledToken(5)] for r in out.requests if r.sample}))
            kv.check_integrity()
            steps += 1
            assert steps < 100
        report[policy] = {"steps": steps, "preemptions": s.num_preemptions,
                          "hits": kv.prefix_hits, "free": kv.num_free_blocks}
    assert make_policy("fcfs", lambda: 1.0).clock() == 1.0
    report["torch_loaded"] = "torch" in sys.modules
    print(json.dumps(report))
"""


def test_core_imports_and_schedules_with_torch_blocked():
    proc = run_without_torch(CHILD)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report.pop("torch_loaded") is False
    for policy, r in report.items():
        # Three 10-token prompts sharing two full blocks; 7 blocks of 4 tokens force preemption.
        assert r["free"] == 7, policy
        assert r["hits"] > 0, policy
        assert r["preemptions"] > 0, policy


def test_blocker_really_blocks_torch():
    """The finder does refuse torch (else the test above proves nothing)."""
    proc = run_without_torch("import torch\n", timeout=60)
    assert proc.returncode != 0 and "blocked in this test" in proc.stderr
