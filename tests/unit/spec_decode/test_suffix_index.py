"""The compact per-request suffix index equals the plain count trie (the reference)."""
from __future__ import annotations

import random

import pytest

from kvserve.spec_decode.suffix_index import CompactSuffixIndex
from kvserve.spec_decode.suffix_tree import SequenceCursor, SuffixTrie, longest_match


def test_matches_and_continuations_equal_the_trie():
    rng = random.Random(0)
    checks = 0
    for trial in range(250):
        D = rng.choice([2, 3, 4, 6, 8])
        V = rng.choice([2, 3, 5, 30])
        n = rng.randrange(1, 50)
        toks = [rng.randrange(V) for _ in range(n)]
        ref, cur, fast = SuffixTrie(D), SequenceCursor(), CompactSuffixIndex(D)
        i = 0
        while i < n:
            j = i + rng.randrange(1, 5)
            ref.extend(cur, toks[i:j])
            fast.extend(toks[i:j])
            i = min(j, n)
            for lo, hi in [(1, D - 1), (1, max(1, D // 2)), (2, D - 1)]:
                if lo > hi:
                    continue
                node_r, m_r = longest_match(ref, toks[:i], lo, hi, cur.active)
                node_f, m_f = fast.match(lo, hi)
                assert m_r == m_f, (trial, toks[:i], lo, hi)
                if m_r:
                    assert fast.count[node_f] == ref.count[node_r]
                    assert fast.num_continued(node_f) == ref.child_total[node_r]
                    for k in (1, 3, 8):
                        for min_prob in (0.0, 0.3):
                            a = ref.continuation(node_r, m_r, k, min_prob)
                            b = fast.continuation(node_f, m_f, k, min_prob)
                            assert a[0] == b[0] and a[1] == pytest.approx(b[1]), (trial, toks[:i], m_r, k)
                            checks += 1
    assert checks > 1000


def test_novel_text_costs_about_one_node_per_token():
    rng = random.Random(1)
    toks = [rng.randrange(50000) for _ in range(3000)]
    fast = CompactSuffixIndex(24)
    fast.extend(toks)
    ref = SuffixTrie(24)
    ref.extend(SequenceCursor(), toks[:300])
    assert fast.num_nodes < 1.2 * len(toks)  # the plain trie: ~24 per token
    assert ref.num_nodes > 20 * 300


def test_depth_validation():
    with pytest.raises(ValueError):
        CompactSuffixIndex(1)
