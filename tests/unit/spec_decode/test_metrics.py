"""Speculative decoding counters on exact inputs."""
from __future__ import annotations

import pytest

from kvserve.spec_decode.metrics import SpecDecodeMetrics


def test_counts_and_derived_rates():
    m = SpecDecodeMetrics()
    m.observe(3, 3)
    m.observe(3, 1)
    m.observe(2, 0)
    m.observe(0, 0)  # no draft: not counted
    assert (m.num_drafts, m.num_draft_tokens, m.num_accepted_tokens) == (3, 8, 4)
    assert m.proposed_per_position == [3, 3, 2]
    assert m.accepted_per_position == [2, 1, 1]
    assert m.acceptance_rate == 0.5
    assert m.mean_acceptance_length == pytest.approx(1 + 4 / 3)
    assert m.acceptance_rate_per_position == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    d = m.as_dict()
    assert d["num_draft_tokens"] == 8 and d["accepted_per_position"] == [2, 1, 1]


def test_merge_and_empty():
    a, b = SpecDecodeMetrics(), SpecDecodeMetrics()
    assert a.acceptance_rate == 0.0 and a.mean_acceptance_length == 0.0
    a.observe(1, 1)
    b.observe(4, 2)
    a.merge(b)
    assert a.proposed_per_position == [2, 1, 1, 1] and a.accepted_per_position == [2, 1, 0, 0]
    assert a.num_drafts == 2 and a.num_accepted_tokens == 3
    with pytest.raises(ValueError):
        a.observe(1, 2)
