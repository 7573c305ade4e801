"""N-gram prompt lookup: exact proposals, the incremental index equal to the plain scan."""
from __future__ import annotations

import random

import pytest

from kvserve.spec_decode import make_proposer
from kvserve.spec_decode.ngram import NgramProposer, ngram_propose_reference


def test_longest_n_wins_and_most_recent_occurrence():
    p = NgramProposer(min_n=1, max_n=3)
    # "7 8" occurs at 0 (followed by 1) and at 4 (followed by 2); the 3-gram "9 7 8" only at 3..5 -> 2.
    s = p.new_state([7, 8, 1, 9, 7, 8, 2, 5, 9, 7, 8])
    assert p.propose(s, 3) == [2, 5, 9]
    # Without the 3-gram match, the most recent "7 8" (at 4) wins over the older one.
    s = p.new_state([7, 8, 1, 6, 7, 8, 2, 5, 3, 7, 8])
    assert p.propose(s, 2) == [2, 5]


def test_min_n_is_respected_and_no_match_gives_nothing():
    p = NgramProposer(min_n=2, max_n=3)
    s = p.new_state([1, 2, 3, 4, 5, 3])  # only a 1-gram repeats
    assert p.propose(s, 4) == []
    assert NgramProposer(min_n=1, max_n=3).propose(NgramProposer(1, 3).new_state([1, 2, 3, 4, 5, 3]), 4) == [4, 5, 3, 4]


def test_periodic_continuation_runs_into_its_own_copy():
    p = NgramProposer(min_n=1, max_n=2)
    s = p.new_state([5, 6, 5, 6])
    # "5 6" last occurred at 0..2 with continuation at 2: copy 5 6 then continue the period.
    assert p.propose(s, 5) == [5, 6, 5, 6, 5]
    s = p.new_state([4, 4])
    assert p.propose(s, 3) == [4, 4, 4]


def test_k_zero_and_short_sequences():
    p = NgramProposer(min_n=1, max_n=4)
    assert p.propose(p.new_state([1]), 3) == []
    assert p.propose(p.new_state([]), 3) == []
    assert p.propose(p.new_state([1, 1]), 0) == []
    with pytest.raises(ValueError):
        p.propose(p.new_state([1, 1]), -1)


def test_incremental_index_equals_reference_scan():
    rng = random.Random(0)
    for trial in range(60):
        min_n, max_n = rng.choice([(1, 1), (1, 3), (2, 4), (3, 5)])
        vocab = rng.choice([2, 3, 5, 20])
        p = NgramProposer(min_n, max_n)
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 30))]
        s = p.new_state(prompt)
        for step in range(25):
            k = rng.randrange(0, 7)
            assert p.propose(s, k) == ngram_propose_reference(s.token_ids, k, min_n, max_n), (trial, step)
            s.append([rng.randrange(vocab) for _ in range(rng.randrange(1, 4))])


def test_append_keeps_prompt_length_and_validates():
    p = NgramProposer()
    s = p.new_state([1, 2, 3])
    s.append([4, 5])
    assert s.token_ids == [1, 2, 3, 4, 5] and s.num_prompt_tokens == 3 and s.output_token_ids == [4, 5]
    with pytest.raises(ValueError):
        s.append([-1])
    with pytest.raises(ValueError):
        NgramProposer(min_n=3, max_n=2)
    with pytest.raises(ValueError):
        make_proposer("ngramz")
    assert isinstance(make_proposer("ngram", min_n=1, max_n=2), NgramProposer)


def test_cost_per_call_does_not_grow_with_length():
    """O(max_n^2) per call: a proposal on a 20k-token sequence touches only the index."""
    import time

    p = NgramProposer(1, 4)
    rng = random.Random(1)
    long = p.new_state([rng.randrange(1000) for _ in range(20000)])
    short = p.new_state([rng.randrange(1000) for _ in range(200)])

    def per_call(s):  # the best of several rounds: robust to a busy machine
        best = float("inf")
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(100):
                p.propose(s, 8)
            best = min(best, (time.perf_counter() - t) / 100)
        return best

    # The reference scan is O(len); the index must not be (generous factor for noisy CI).
    assert per_call(long) < 5 * per_call(short) + 20e-6
