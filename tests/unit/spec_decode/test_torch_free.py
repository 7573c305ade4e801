"""The scheduler-side parts (proposers, adaptive length, metrics) import and run without torch."""
from __future__ import annotations

import json

from tests.helpers.torch_blocked import run_without_torch

CHILD = """
    import json, sys

    from kvserve.spec_decode import make_proposer
    from kvserve.spec_decode.adaptive import LinearStepTime, SpecLengthPolicy
    from kvserve.spec_decode.metrics import SpecDecodeMetrics

    out = {}
    for method in ("ngram", "suffix"):
        p = make_proposer(method)
        s = p.new_state([1, 2, 3, 4, 1, 2, 3])
        out[method] = p.propose(s, 3)
    pol = SpecLengthPolicy(4, step_time=LinearStepTime(1.0, 0.1))
    out["k"] = pol.choose([("a", 4)])
    m = SpecDecodeMetrics()
    m.observe(3, 2)
    out["accepted"] = m.num_accepted_tokens
    out["torch_loaded"] = "torch" in sys.modules
    print(json.dumps(out))
"""


def test_proposers_policy_and_metrics_run_with_torch_blocked():
    proc = run_without_torch(CHILD)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Prior acceptance 0.8, t(n) = 1 + 0.1 n: goodput 0.909, 1.5, 1.88, 2.11, 2.24 for k = 0..4.
    assert out == {"ngram": [4, 1, 2], "suffix": [4, 1, 2], "k": [4], "accepted": 2, "torch_loaded": False}
