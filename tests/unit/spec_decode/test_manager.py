"""SpecDecodeManager: the scheduler-side protocol on exact state."""
from __future__ import annotations

import pytest

from kvserve.spec_decode import make_proposer
from kvserve.spec_decode.adaptive import AcceptanceTracker, LinearStepTime, SpecLengthPolicy
from kvserve.spec_decode.base import Proposer, ProposerState
from kvserve.spec_decode.manager import SpecDecodeManager


def test_propose_commit_finish():
    m = SpecDecodeManager(make_proposer("ngram", min_n=1, max_n=2), SpecLengthPolicy(3, adaptive=False))
    m.add("a", [1, 2, 3, 1, 2])
    m.add("b", [7, 8, 9])
    # "a" matches "1 2" -> 3 1 2; "b" has no repeat; "a" may take only 2 drafts this step.
    assert m.drafts([("a", 2), ("b", 3)]) == {"a": [3, 1]}
    m.commit("a", [3, 5], num_drafted=2, num_accepted=1)  # one accepted, then the correction 5
    m.commit("b", [4], num_drafted=0, num_accepted=0)
    assert m.drafts([("a", 3), ("b", 3)]) == {}  # "a" ends "3 5": neither "3 5" nor "5" seen before
    m.commit("a", [1], num_drafted=0, num_accepted=0)
    assert m.drafts([("a", 3)]) == {"a": [2, 3, 5]}  # "5 1" unseen, "1" last followed by "2 3 5"
    assert (m.metrics.num_drafts, m.metrics.num_draft_tokens, m.metrics.num_accepted_tokens) == (1, 2, 1)
    with pytest.raises(ValueError):
        m.commit("a", [1, 2, 3], num_drafted=2, num_accepted=1)  # more tokens than possible
    with pytest.raises(ValueError):
        m.add("a", [1])
    m.finish("a")
    m.finish("a")  # twice is harmless (abort after finish)
    assert "a" not in m and len(m) == 1


def test_policy_cuts_free_proposals_and_learns():
    pol = SpecLengthPolicy(4, step_time=LinearStepTime(1.0, 0.5),
                           tracker=AcceptanceTracker(4, ema=1.0, prior=0.9, recovery=0.0))
    m = SpecDecodeManager(make_proposer("ngram", min_n=1, max_n=2), pol)
    m.add("a", [5, 6, 7, 8, 9, 5, 6])
    assert m.drafts([("a", 4)]) == {"a": [7, 8, 9, 5]}  # prior 0.9: worth all four
    m.commit("a", [1], num_drafted=4, num_accepted=0)  # rejected at once: rate 0 at position 1
    assert m.drafts([("a", 4)]) == {}


class CountingDraft(Proposer):
    """A stand-in for a draft model: records the k it is asked for."""

    proposes_for_free = False

    def __init__(self) -> None:
        self.asked: list[int] = []

    def new_state(self, prompt_token_ids, num_prompt_tokens=None):
        class S(ProposerState):
            def append(self, token_ids):
                self.token_ids.extend(token_ids)
        s = S(len(prompt_token_ids))
        s.token_ids.extend(prompt_token_ids)
        return s

    def propose(self, state, k):
        self.asked.append(k)
        return [0] * k


def test_a_costly_proposer_is_asked_only_for_the_chosen_k():
    draft = CountingDraft()
    pol = SpecLengthPolicy(4, step_time=LinearStepTime(0.0, 1.0))  # compute-bound: k = 0
    m = SpecDecodeManager(draft, pol)
    m.add("a", [1, 2])
    assert m.drafts([("a", 4)]) == {}
    assert draft.asked == [0]
    m2 = SpecDecodeManager(draft, SpecLengthPolicy(4, adaptive=False))
    m2.add("a", [1, 2])
    assert m2.drafts([("a", 3)]) == {"a": [0, 0, 0]} and draft.asked[-1] == 3


def test_finish_feeds_the_global_suffix_tree():
    m = SpecDecodeManager(make_proposer("suffix", global_max_tokens=100, max_spec_factor=4.0),
                          SpecLengthPolicy(4, adaptive=False))
    m.add("a", [100])
    m.commit("a", [1, 2, 3, 4, 5], num_drafted=0, num_accepted=0)
    m.finish("a")
    m.add("b", [50, 1, 2])
    assert m.drafts([("b", 3)]) == {"b": [3, 4, 5]}
