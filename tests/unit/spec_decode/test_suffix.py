"""Suffix trie counts against brute force; suffix-decoding proposals on exact cases."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from kvserve.spec_decode import make_proposer
from kvserve.spec_decode.suffix import SuffixProposer
from kvserve.spec_decode.suffix_tree import ROOT, SequenceCursor, SuffixTrie, longest_match


def substring_counts(seqs, depth):
    c = Counter()
    for s in seqs:
        for i in range(len(s)):
            for d in range(1, depth + 1):
                if i + d <= len(s):
                    c[tuple(s[i:i + d])] += 1
    return c


def trie_counts(trie):
    out = {}
    stack = [(ROOT, ())]
    while stack:
        node, path = stack.pop()
        for ch in trie.children(node):
            p = path + (trie.token[ch],)
            out[p] = trie.count[ch]
            stack.append((ch, p))
    return out


def test_counts_equal_brute_force_through_adds_and_removals():
    rng = random.Random(0)
    trie = SuffixTrie(max_depth=4)
    live = []
    for step in range(40):
        if live and rng.random() < 0.35:
            seq = live.pop(rng.randrange(len(live)))
            trie.remove(seq)
        else:
            seq = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
            cur = SequenceCursor()
            # Extend in random pieces: the cursor carries the sequence across calls.
            i = 0
            while i < len(seq):
                j = i + rng.randrange(1, 4)
                trie.extend(cur, seq[i:j])
                i = j
            live.append(seq)
        trie.check_integrity()
        assert trie_counts(trie) == dict(substring_counts(live, 4)), step
    for seq in live:
        trie.remove(seq)
    trie.check_integrity()
    assert trie.num_nodes == 1  # everything freed


def test_freed_nodes_are_reused():
    trie = SuffixTrie(max_depth=3)
    trie.extend(SequenceCursor(), [1, 2, 3])
    n = len(trie.count)
    trie.remove([1, 2, 3])
    trie.extend(SequenceCursor(), [4, 5, 6])
    assert len(trie.count) == n  # same storage, recycled ids
    trie.check_integrity()


def test_proposes_the_most_frequent_continuation():
    p = SuffixProposer(max_depth=8, max_match=4, min_prob=0.0, max_spec_factor=4.0)
    # After "1 2": 3 twice (then 4), 5 once.  The most frequent branch wins, not the most recent.
    s = p.new_state([1, 2, 3, 4, 9, 1, 2, 3, 4, 8, 1, 2, 5, 7, 1, 2])
    assert p.propose(s, 2) == [3, 4]
    # n-gram lookup would take the most recent occurrence instead.
    assert make_proposer("ngram", min_n=1, max_n=4).propose(
        make_proposer("ngram", min_n=1, max_n=4).new_state(s.token_ids), 2) == [5, 7]


def test_min_prob_stops_at_an_uncertain_branch():
    toks = [1, 2, 3, 4, 9, 1, 2, 3, 6, 8, 1, 2]  # after "1 2 3": 4 or 6, each 1/2
    s_high = SuffixProposer(max_depth=8, max_match=4, min_prob=0.6, max_spec_factor=4.0)
    s_low = SuffixProposer(max_depth=8, max_match=4, min_prob=0.4, max_spec_factor=4.0)
    assert s_high.propose(s_high.new_state(toks), 4) == [3]
    # Path probability 1, 1/2, 1/2, 1/2 >= 0.4: goes on through the branch; ties take the most
    # recent occurrence (6 after "1 2 3").
    assert s_low.propose(s_low.new_state(toks), 4) == [3, 6, 8, 1]


def test_spec_length_is_bounded_by_match_length():
    toks = [5, 6, 7, 8, 9, 10, 11, 12, 5]  # only a length-1 match ("5")
    p1 = SuffixProposer(max_depth=16, max_match=8, max_spec_factor=1.0)
    p3 = SuffixProposer(max_depth=16, max_match=8, max_spec_factor=3.0)
    assert p1.propose(p1.new_state(toks), 8) == [6]
    assert p3.propose(p3.new_state(toks), 8) == [6, 7, 8]


def test_active_nodes_match_walking_from_the_root():
    rng = random.Random(3)
    for _ in range(30):
        toks = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        trie, cur = SuffixTrie(6), SequenceCursor()
        trie.extend(cur, toks)
        assert longest_match(trie, toks, 1, 5, cur.active) == longest_match(trie, toks, 1, 5, None)


def test_global_tree_helps_a_new_request_and_stays_bounded():
    p = SuffixProposer(max_depth=8, max_match=4, global_max_tokens=12, max_spec_factor=4.0)
    a = p.new_state([100, 101])
    a.append([1, 2, 3, 4, 5, 6])  # output
    p.finish(a)
    b = p.new_state([50, 1, 2])  # its own tree has no earlier "1 2"; the global one does
    assert p.propose(b, 3) == [3, 4, 5]
    assert p.global_window_tokens == 6
    # Two more outputs push the first out of the 12-token window.
    for out in ([7, 7, 7, 7, 7, 7], [8, 8, 8, 8, 8, 8]):
        st = p.new_state([0])
        st.append(out)
        p.finish(st)
    assert p.global_window_tokens == 12
    assert p.global_tree is not None
    p.global_tree.check_integrity()
    assert p.propose(p.new_state([50, 1, 2]), 3) == []  # forgotten
    assert p.global_tree.num_nodes == 1 + 6 + 6  # root, "7" * 1..6 and "8" * 1..6: the first output is gone


def test_validation():
    with pytest.raises(ValueError):
        SuffixProposer(max_depth=8, max_match=8)
    with pytest.raises(ValueError):
        SuffixProposer(min_prob=2.0)
    with pytest.raises(ValueError):
        SuffixTrie(max_depth=1)
    with pytest.raises(TypeError):
        SuffixProposer().propose(make_proposer("ngram").new_state([1, 2]), 2)


def test_forked_state_proposes_like_the_original():
    """n > 1: a sample forked mid-output gets a fresh state from the tokens so far."""
    for method in ("ngram", "suffix"):
        p = make_proposer(method)
        s = p.new_state([1, 2, 3, 4, 5, 1, 2])
        s.append([3, 4, 9, 1, 2])
        fork = p.new_state(s.token_ids, num_prompt_tokens=s.num_prompt_tokens)
        assert fork.output_token_ids == [3, 4, 9, 1, 2] and fork.token_ids == s.token_ids
        assert p.propose(fork, 4) == p.propose(s, 4) != []
