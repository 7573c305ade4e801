"""The per-request suffix tree, compact: only substrings that occur twice get a node of their own.

Same counts, matches and continuations as kvserve.spec_decode.suffix_tree.SuffixTrie
over one append-only sequence (held equal to it in tests/unit/spec_decode/test_suffix_index.py),
in a fraction of the memory: a substring that occurs once is a *leaf* that
remembers where its occurrence ends, and everything below it is read from the
token list instead of being stored.  Novel text costs about one leaf per
token instead of `max_depth` trie nodes.

Nodes: *expanded* ones (the root, and every substring with count >= 2) have
their children materialised; a leaf (count 1) has none, and its unique
occurrence ends at `last_end[leaf]` (exclusive), so its continuation is
tokens[last_end:].  When a leaf is reached a second time it is expanded: its
old occurrence's next token becomes a leaf child, and the new occurrence
continues as usual.

Active suffixes (the sequence's last d tokens, d < max_depth) are kept as
(anchor node, anchor depth): the deepest node known on the suffix's path.  A
suffix inside a leaf's unique region needs no work on append (everything
below a leaf has count 1); an anchor made stale by a later expansion is walked
down lazily, each step moving it deeper, so the work is O(max_depth) per token
amortised.  Suffixes are processed longest first on each append: the only
suffix whose occurrence can end where a newly expanded leaf's old occurrence
ends is the next longer one, and processing it first (it skips the leaf)
leaves the expansion to count that occurrence exactly once.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable

_NONE = -1
_STRIDE = 1 << 32  # edge key = node * stride + token


class CompactSuffixIndex:
    """Counts of every substring of length <= max_depth of one growing token sequence."""

    def __init__(self, max_depth: int) -> None:
        if not isinstance(max_depth, int) or max_depth < 2:
            raise ValueError(f"suffix tree depth must be an integer >= 2, got {max_depth!r}")
        self.max_depth = max_depth
        self.tokens: list[int] = []
        self._edges: dict[int, int] = {}
        self.count: list[int] = [0]
        self.child_total: list[int] = [0]  # expanded nodes only (any node: num_continued)
        self.best: list[int] = [_NONE]  # expanded nodes: child with the max (count, last_end)
        self.last_end: list[int] = [0]  # end (exclusive) of the latest occurrence
        self.token: list[int] = [_NONE]
        self.depth: list[int] = [0]
        # Active suffixes, longest first: [anchor, start]; the suffix is tokens[start:].
        self._active: deque[list[int]] = deque([[0, 0]])

    @property
    def num_nodes(self) -> int:
        return len(self.count)

    def expanded(self, node: int) -> bool:
        return node == 0 or self.count[node] >= 2

    def num_continued(self, node: int) -> int:
        """Occurrences of the node's substring followed by a token (within max_depth)."""
        if self.expanded(node):
            return self.child_total[node]
        return int(self.last_end[node] < len(self.tokens) and self.depth[node] < self.max_depth)

    # ---------------------------------------------------------------- updates
    def extend(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            self._append(t)

    def _append(self, t: int) -> None:
        L = len(self.tokens)
        self.tokens.append(t)
        D = self.max_depth
        count, depth = self.count, self.depth
        for entry in self._active:  # longest first
            anchor = entry[0]
            if anchor and count[anchor] == 1:
                continue  # at or inside a leaf's unique region: every count below stays 1
            if depth[anchor] < L - entry[1]:
                anchor = self._resolve(entry, L)  # expanded since: walk down
                if depth[anchor] < L - entry[1] or count[anchor] == 1:
                    continue
            entry[0] = self._step(anchor, t, L + 1)
        self._active.append([0, L + 1])  # the empty suffix of the new sequence
        while L + 1 - self._active[0][1] >= D:
            self._active.popleft()  # reached max_depth: no longer extended

    def _resolve(self, entry: list[int], length: int) -> int:
        """Walk a suffix's anchor down through nodes expanded since it was set."""
        anchor, start = entry
        d = length - start
        while self.depth[anchor] < d and self.expanded(anchor):
            anchor = self._edges[anchor * _STRIDE + self.tokens[start + self.depth[anchor]]]
        entry[0] = anchor
        return anchor

    def _step(self, node: int, t: int, end: int) -> int:
        """Count one occurrence of node's substring + t, ending at `end`; returns that child."""
        key = node * _STRIDE + t
        c = self._edges.get(key, _NONE)
        if c == _NONE:
            c = self._new_node(t, self.depth[node] + 1, end)
            self._edges[key] = c
        else:
            if self.count[c] == 1:
                self._expand(c)
            self.count[c] += 1
            self.last_end[c] = end
        self.child_total[node] += 1
        b = self.best[node]
        if b == _NONE or self.count[c] >= self.count[b]:
            self.best[node] = c  # c is the most recent occurrence: it wins ties
        return c

    def _expand(self, leaf: int) -> None:
        """A leaf gets a second occurrence: give its first occurrence's continuation a leaf."""
        old_end = self.last_end[leaf]
        if self.depth[leaf] >= self.max_depth or old_end >= len(self.tokens):
            return
        t = self.tokens[old_end]
        g = self._new_node(t, self.depth[leaf] + 1, old_end + 1)
        self._edges[leaf * _STRIDE + t] = g
        self.child_total[leaf] = 1
        self.best[leaf] = g

    def _new_node(self, token: int, depth: int, end: int) -> int:
        n = len(self.count)
        self.count.append(1)
        self.child_total.append(0)
        self.best.append(_NONE)
        self.last_end.append(end)
        self.token.append(token)
        self.depth.append(depth)
        return n

    # ---------------------------------------------------------------- queries
    def match(self, min_len: int, max_len: int) -> tuple[int, int]:
        """(node, length) of the longest suffix, min_len <= length <= max_len, that occurred
        before with a continuation; (-1, 0) if none."""
        L = len(self.tokens)
        hi = min(max_len, L, self.max_depth - 1)
        for entry in self._active:  # longest first
            m = L - entry[1]
            if m > hi or m < min_len:
                continue
            node = self._resolve(entry, L)
            if self.depth[node] == m and self.expanded(node) and self.child_total[node] > 0:
                return node, m
        return _NONE, 0

    def continuation(self, node: int, depth: int, k: int, min_prob: float) -> tuple[list[int], float]:
        """As SuffixTrie.continuation: follow the most frequent child while the path
        probability stays >= min_prob; below a leaf, copy its occurrence (probability 1)."""
        out: list[int] = []
        prob, score = 1.0, 0.0
        L = len(self.tokens)
        while len(out) < k and depth < self.max_depth:
            if not self.expanded(node):
                pos = self.last_end[node] + (depth - self.depth[node])
                if pos >= L or prob < min_prob:
                    break
                out.append(self.tokens[pos])
                score += prob
                depth += 1
                continue
            c = self.best[node]
            if c == _NONE:
                break
            p = prob * self.count[c] / self.child_total[node]
            if p < min_prob:
                break
            prob = p
            score += p
            out.append(self.token[c])
            node, depth = c, depth + 1
        return out, score
