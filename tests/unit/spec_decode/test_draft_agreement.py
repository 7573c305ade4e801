"""Teacher-forced draft acceptance (draft_agreement.py) equals the fixed-k reference loop's."""
from __future__ import annotations

import pytest

from kvserve.spec_decode.dense_runner import DenseModelRunner
from kvserve.spec_decode.draft_agreement import agreement, fixed_k_metrics, greedy_sequence
from kvserve.spec_decode.draft_model import DraftModelProposer
from kvserve.spec_decode.reference import speculative_generate
from kvserve.spec_decode.truncated_draft import write_truncated_draft
from tests.helpers.tiny_models import build_tiny_model

PROMPTS = [[5, 17, 99, 3, 250, 17, 99, 3, 250, 42, 7, 5, 17, 99], list(range(40, 70)) + list(range(40, 52))]
NEW = 24


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("agreement")
    target_dir = build_tiny_model("llama-tied", root / "t", seed=3, overrides={"num_hidden_layers": 4})
    # An early-exit draft (partial agreement) and the target itself (full agreement).
    return target_dir, [write_truncated_draft(target_dir, root / "d", 2), target_dir]


@pytest.mark.parametrize("k", [1, 4])
def test_teacher_forced_acceptance_equals_the_reference_loop(dirs, k):
    target_dir, drafts = dirs
    target = DenseModelRunner.load(target_dir)
    seen_partial = False
    for d in drafts:
        runner = DenseModelRunner.load(d)
        for p in PROMPTS:
            out = greedy_sequence(target, p, NEW)
            agree = agreement(runner, p, out)
            want = speculative_generate(target, DraftModelProposer(runner), p + out[:1], NEW - 1,
                                        num_spec_tokens=k).metrics
            got = fixed_k_metrics(agree, k, start=1)
            assert got.as_dict() == want.as_dict()
            seen_partial = seen_partial or 0 < sum(agree) < len(agree)
    assert seen_partial, "the early-exit draft agreed everywhere or nowhere: the test has no power"
