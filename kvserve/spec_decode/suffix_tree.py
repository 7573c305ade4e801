"""A count trie of every substring (up to `max_depth` tokens) of a set of token sequences.

This is the depth-bounded suffix tree SuffixDecoding (Oliaro et al., 2024)
speculates from: the node for a substring s counts how often s occurs, so
the most frequent child of s is the most frequent continuation of s, and
count(child) / sum(children) its empirical probability.

Online: each sequence keeps its *active* nodes, the nodes of its suffixes of
length 0..max_depth-1 (`active[d]` is the node of its last d tokens).
Appending token t moves every active node to its child t (made if missing)
and counts one occurrence there: O(max_depth) dict operations per token.
Removing a sequence walks its substrings again and uncounts them; nodes that
reach zero are freed (a child never outcounts its parent, so a freed node's
whole subtree is freed with it).  That is what keeps a global tree over
recent requests bounded.

Storage is flat: one dict `(node, token) -> child` for all edges, and per
node plain lists (count, sum of children's counts, most frequent child,
edge token, first child / next sibling for enumeration).  Node 0 is the root.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

ROOT = 0
_NONE = -1
_TOKEN_STRIDE = 1 << 32  # edge key = node * stride + token; token ids are < 2^32


@dataclass(slots=True)
class SequenceCursor:
    """Where one sequence stands in a trie: its active suffix nodes, by length."""

    active: list[int] = field(default_factory=lambda: [ROOT])
    num_tokens: int = 0


class SuffixTrie:
    """Substrings of length <= max_depth with occurrence counts; see the module docstring."""

    def __init__(self, max_depth: int) -> None:
        if not isinstance(max_depth, int) or max_depth < 2:
            raise ValueError(f"suffix tree depth must be an integer >= 2, got {max_depth!r}")
        self.max_depth = max_depth
        self._edges: dict[int, int] = {}
        self.count: list[int] = [0]  # occurrences of the node's substring
        self.child_total: list[int] = [0]  # sum of the children's counts (continued occurrences)
        self.best: list[int] = [_NONE]  # most frequent child (ties: the most recently counted)
        self.token: list[int] = [_NONE]  # the token on the edge into the node
        self._first_child: list[int] = [_NONE]
        self._next_sibling: list[int] = [_NONE]
        self._free: list[int] = []

    # ---------------------------------------------------------------- queries
    @property
    def num_nodes(self) -> int:
        """Live nodes, the root included."""
        return len(self.count) - len(self._free)

    def child(self, node: int, token: int) -> int:
        return self._edges.get(node * _TOKEN_STRIDE + token, _NONE)

    def find(self, tokens: Sequence[int]) -> int:
        """The node of substring `tokens`, or -1 if it does not occur (or is too long)."""
        if len(tokens) > self.max_depth:
            return _NONE
        node = ROOT
        for t in tokens:
            node = self._edges.get(node * _TOKEN_STRIDE + t, _NONE)
            if node == _NONE:
                return _NONE
        return node

    def children(self, node: int) -> list[int]:
        out = []
        c = self._first_child[node]
        while c != _NONE:
            out.append(c)
            c = self._next_sibling[c]
        return out

    def continuation(self, node: int, depth: int, k: int, min_prob: float) -> tuple[list[int], float]:
        """Follow the most frequent child from `node` (at `depth`) for up to k tokens.

        Stops when the path's probability (product of count(child) / child_total(parent))
        would fall below `min_prob`.  Returns the tokens and their score, the sum of the
        path probabilities after each token: the expected number accepted if the
        counts were the true distribution.
        """
        out: list[int] = []
        prob, score = 1.0, 0.0
        while len(out) < k and depth < self.max_depth:
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

    # ---------------------------------------------------------------- updates
    def extend(self, cursor: SequenceCursor, tokens: Iterable[int]) -> None:
        """Append tokens to the sequence at `cursor`, counting every new substring."""
        D = self.max_depth
        active = cursor.active
        for t in tokens:
            nxt = [ROOT]
            for d, node in enumerate(active):
                c = self._get_or_add(node, t)
                self.count[c] += 1
                self.child_total[node] += 1
                b = self.best[node]
                if b == _NONE or self.count[c] >= self.count[b]:
                    self.best[node] = c
                if d + 1 < D:
                    nxt.append(c)
            active = nxt
            cursor.num_tokens += 1
        cursor.active = active

    def remove(self, tokens: Sequence[int]) -> None:
        """Uncount a sequence previously added with `extend` (all of `tokens`, from a fresh cursor)."""
        D = self.max_depth
        for start in range(len(tokens)):
            node = ROOT
            for t in tokens[start:start + D]:
                c = self._edges[node * _TOKEN_STRIDE + t]
                self.count[c] -= 1
                self.child_total[node] -= 1
                if self.count[c] == 0:
                    self._unlink(node, c)
                    self._free_subtree(c)
                    break
                if self.best[node] == c:
                    self._refresh_best(node)
                node = c

    # ---------------------------------------------------------------- internals
    def _get_or_add(self, node: int, token: int) -> int:
        key = node * _TOKEN_STRIDE + token
        c = self._edges.get(key, _NONE)
        if c != _NONE:
            return c
        if self._free:
            c = self._free.pop()
            self.count[c] = 0
            self.child_total[c] = 0
            self.best[c] = _NONE
            self.token[c] = token
            self._first_child[c] = _NONE
        else:
            c = len(self.count)
            self.count.append(0)
            self.child_total.append(0)
            self.best.append(_NONE)
            self.token.append(token)
            self._first_child.append(_NONE)
            self._next_sibling.append(_NONE)
        self._next_sibling[c] = self._first_child[node]
        self._first_child[node] = c
        self._edges[key] = c
        return c

    def _unlink(self, parent: int, c: int) -> None:
        del self._edges[parent * _TOKEN_STRIDE + self.token[c]]
        prev, cur = _NONE, self._first_child[parent]
        while cur != c:
            prev, cur = cur, self._next_sibling[cur]
        if prev == _NONE:
            self._first_child[parent] = self._next_sibling[c]
        else:
            self._next_sibling[prev] = self._next_sibling[c]
        if self.best[parent] == c:
            self._refresh_best(parent)

    def _free_subtree(self, c: int) -> None:
        stack = [c]
        while stack:
            n = stack.pop()
            for ch in self.children(n):
                del self._edges[n * _TOKEN_STRIDE + self.token[ch]]
                stack.append(ch)
            self._first_child[n] = _NONE
            self.count[n] = 0
            self.child_total[n] = 0
            self.best[n] = _NONE
            self._free.append(n)

    def _refresh_best(self, node: int) -> None:
        best, best_count = _NONE, 0
        for ch in self.children(node):
            if self.count[ch] > best_count:
                best, best_count = ch, self.count[ch]
        self.best[node] = best

    def check_integrity(self) -> None:
        """Counts and links agree (tests call this after every operation)."""
        live = {ROOT}
        stack = [ROOT]
        while stack:
            n = stack.pop()
            kids = self.children(n)
            total = 0
            for ch in kids:
                assert self._edges[n * _TOKEN_STRIDE + self.token[ch]] == ch
                assert 0 < self.count[ch] <= self.count[n] or n == ROOT, (n, ch)
                total += self.count[ch]
                live.add(ch)
                stack.append(ch)
            assert total == self.child_total[n], (n, total, self.child_total[n])
            if kids:
                assert self.count[self.best[n]] == max(self.count[ch] for ch in kids)
            else:
                assert self.best[n] == _NONE
        assert len(live) == self.num_nodes
        assert len(self._edges) == self.num_nodes - 1
        assert not live & set(self._free)


def longest_match(trie: SuffixTrie, context: Sequence[int], min_len: int, max_len: int,
                  active: Optional[list[int]] = None) -> tuple[int, int]:
    """(node, length) of the longest suffix of `context` with min_len <= length <= max_len
    that occurs in `trie` followed by something; (-1, 0) if none.

    `active` (a cursor's active list for this very context) saves the walks.
    """
    hi = min(max_len, len(context), trie.max_depth - 1)
    for m in range(hi, min_len - 1, -1):
        if active is not None:
            node = active[m] if m < len(active) else _NONE
        else:
            node = trie.find(context[len(context) - m:])
        if node != _NONE and trie.child_total[node] > 0:
            return node, m
    return _NONE, 0
