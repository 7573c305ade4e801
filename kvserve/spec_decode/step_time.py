"""The engine's own step-time model for adaptive speculation, fitted online.

`OnlineStepTime` records (batched tokens, seconds) of every engine step and
answers t(n) from them: the median of the recent steps per token-count bucket,
made non-decreasing in n (pooled by each bucket's samples: `monotone_fit`), linear
between buckets and along the last segment beyond (the shape of `InterpolatedStepTime`;
a line through a CPU's points misleads, docs/spec_decode.md section 3).

With one bucket measured it answers optimistically, flat: "extra tokens cost
nothing" until measured otherwise, so the policy does try speculating and the
steps it then runs (base + drafts tokens) are measured.  Below the smallest
measured bucket it extends the first segment (at least proportionally to n:
for the concave step times of real hardware that overestimates, never
underestimates).  The scheduler side also runs a step without drafts whenever
the no-draft step size is not measured yet (`has`), so speculation is always
compared against a measured no-speculation step.  A `prior` model, when given,
answers until two buckets are known.

Pure Python (no torch): the scheduler side calls it.
"""
from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Optional, Sequence

from kvserve.spec_decode.adaptive import StepTime

_EXACT_UP_TO = 16  # token counts up to this are their own bucket
_RATIO = 1.1  # beyond, buckets grow geometrically


def bucket(num_tokens: int) -> int:
    """The bucket a step of `num_tokens` tokens is filed under (its representative count)."""
    if num_tokens <= _EXACT_UP_TO:
        return max(1, num_tokens)
    j = round(math.log(num_tokens / _EXACT_UP_TO) / math.log(_RATIO))
    return max(_EXACT_UP_TO + 1, int(round(_EXACT_UP_TO * _RATIO ** j)))


def monotone_fit(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in weighted least squares (pool
    adjacent violators).  A running max would let one slow step, measured once in a small
    bucket, raise every larger bucket to it, so that extra tokens look free; pooling weighs
    it against the buckets measured many times."""
    blocks: list[list[float]] = []  # [weighted mean, weight, number of values pooled]
    for v, w in zip(values, weights):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m1, w1, n1 = blocks.pop()
            m0, w0, n0 = blocks[-1]
            blocks[-1] = [(m0 * w0 + m1 * w1) / (w0 + w1), w0 + w1, n0 + n1]
    out: list[float] = []
    for m, _, n in blocks:
        out += [m] * int(n)
    return out


class OnlineStepTime:
    """t(n) from the last `window` steps measured in each bucket (see the module docstring)."""

    def __init__(self, window: int = 16, prior: Optional[StepTime] = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.prior = prior
        self._samples: dict[int, deque[float]] = {}
        self._xs: list[int] = []  # bucket counts, increasing
        self._ys: list[float] = []  # their non-decreasing median seconds
        self._dirty = False

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens < 1 or not seconds > 0:
            return  # an empty or unmeasured step says nothing
        b = bucket(num_tokens)
        q = self._samples.get(b)
        if q is None:
            q = self._samples[b] = deque(maxlen=self.window)
        q.append(float(seconds))
        self._dirty = True

    @property
    def num_buckets(self) -> int:
        return len(self._samples)

    def has(self, num_tokens: int) -> bool:
        """True when steps of about `num_tokens` tokens (its bucket) were measured."""
        return bucket(num_tokens) in self._samples

    def _rebuild(self) -> None:
        xs = sorted(self._samples)
        medians = []
        for b in xs:
            ts = sorted(self._samples[b])
            medians.append(ts[len(ts) // 2])
        self._xs = xs
        self._ys = monotone_fit(medians, [len(self._samples[b]) for b in xs])
        self._dirty = False

    def __call__(self, num_tokens: int) -> float:
        if self._dirty:
            self._rebuild()
        xs, ys = self._xs, self._ys
        if len(xs) < 2 and self.prior is not None:
            return self.prior(num_tokens)
        if not xs:
            return 1.0  # nothing measured: every step size costs the same
        if num_tokens <= xs[0]:
            if len(xs) == 1:
                return ys[0]
            chord = ys[0] - (ys[1] - ys[0]) * (xs[0] - num_tokens) / (xs[1] - xs[0])
            return max(chord, ys[0] * max(num_tokens, 1) / xs[0])
        i = bisect.bisect_left(xs, num_tokens)
        if i < len(xs):
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0)
        if len(xs) == 1:
            return ys[0]
        x0, x1, y0, y1 = xs[-2], xs[-1], ys[-2], ys[-1]
        return y1 + (y1 - y0) * (num_tokens - x1) / (x1 - x0)
