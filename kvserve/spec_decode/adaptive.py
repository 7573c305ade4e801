"""Adaptive speculation length (after SmartSpec, Liu et al. 2024: maximise goodput).

Per step, for the B decoding requests that could speculate, choose k_i in
[0, max_k_i] (0 = no speculation) maximising the batch's expected emitted
tokens per second:

    goodput(k) = sum_i E_i(k_i) / (t(base + sum_i (k_i + 1)) + draft_cost(sum_i k_i))
    E_i(k) = 1 + sum_{j=1..k} prod_{l=1..j} a_{i,l}

where a_{i,l} is request i's acceptance rate at draft position l *given*
positions < l were accepted, t(n) the target's step time for n batched
tokens (`base` = the other requests' prefill and decode tokens in the same
step) and draft_cost(S) the time to propose S draft tokens (0 for n-gram
and suffix lookup; linear for a draft model).

Exact optimum: each request's increments g_{i,j} = prod_{l<=j} a_{i,l} are
non-increasing in j (a product of factors <= 1), so among all allocations
with S draft tokens in total the best takes the S largest increments over
the batch, and the objective depends on the allocation only through S.
Sorting the increments once and scanning S = 0..sum max_k gives the global
optimum in O(N log N) (N = sum max_k); `test_matches_brute_force` holds it
equal to enumeration.  With a step time that grows with the batch's tokens,
adding a draft with acceptance g pays only while g exceeds the marginal
cost in tokens' worth of time, so at high load (compute-bound steps)
speculation turns itself off.

In a closed batch (every request submitted, nobody waiting) tokens that only make one
request finish early buy nothing: `choose_joint_length` values drafts by the steps they
save for the batch's longest requests instead.

This module is pure Python (no torch): the scheduler calls it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

StepTime = Callable[[int], float]  # batched target tokens -> seconds


# ------------------------------------------------------------------ step-time models
@dataclass(frozen=True, slots=True)
class LinearStepTime:
    """t(n) = fixed_s + per_token_s * n (weights read once per step + per-token compute)."""

    fixed_s: float
    per_token_s: float

    def __post_init__(self) -> None:
        if self.fixed_s < 0 or self.per_token_s < 0 or self.fixed_s + self.per_token_s <= 0:
            raise ValueError(f"step-time coefficients must be >= 0 and not both 0, got {self}")

    def __call__(self, num_tokens: int) -> float:
        return self.fixed_s + self.per_token_s * num_tokens


def fit_linear_step_time(samples: Sequence[tuple[int, float]]) -> LinearStepTime:
    """Least squares fit of (batched tokens, measured step seconds), clamped to >= 0."""
    if len({n for n, _ in samples}) < 2:
        raise ValueError("need step times measured at two or more batch sizes to fit a line")
    n = len(samples)
    mx = sum(x for x, _ in samples) / n
    my = sum(y for _, y in samples) / n
    sxx = sum((x - mx) ** 2 for x, _ in samples)
    slope = max(sum((x - mx) * (y - my) for x, y in samples) / sxx, 0.0)
    fixed = max(my - slope * mx, 0.0)
    if fixed == 0.0 and slope == 0.0:
        raise ValueError("measured step times are all zero")
    return LinearStepTime(fixed, slope)


@dataclass(frozen=True)
class InterpolatedStepTime:
    """t(n) from measured points, linear between them and along the last segment beyond.

    For step times a line fits badly: on CPU a 2-token step can cost far more than a
    1-token one (matrix-vector vs matrix-matrix kernels), then grow slowly.
    """

    points: tuple[tuple[int, float], ...]  # (tokens, seconds), tokens increasing, seconds non-decreasing

    def __post_init__(self) -> None:
        ns = [n for n, _ in self.points]
        if len(ns) < 2 or ns != sorted(set(ns)) or ns[0] < 1:
            raise ValueError(f"need >= 2 points with distinct increasing token counts >= 1, got {self.points}")
        if any(t1 < t0 for (_, t0), (_, t1) in zip(self.points, self.points[1:])) or self.points[0][1] <= 0:
            raise ValueError(f"step times must be positive and non-decreasing in tokens, got {self.points}")

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[int, float]]) -> "InterpolatedStepTime":
        """Median per token count, then made non-decreasing (more tokens never cost less)."""
        by_n: dict[int, list[float]] = {}
        for n, t in samples:
            by_n.setdefault(int(n), []).append(float(t))
        pts, running = [], 0.0
        for n in sorted(by_n):
            ts = sorted(by_n[n])
            running = max(running, ts[len(ts) // 2])
            pts.append((n, running))
        return cls(tuple(pts))

    def __call__(self, num_tokens: int) -> float:
        pts = self.points
        if num_tokens <= pts[0][0]:
            return pts[0][1]
        for (n0, t0), (n1, t1) in zip(pts, pts[1:]):
            if num_tokens <= n1:
                return t0 + (t1 - t0) * (num_tokens - n0) / (n1 - n0)
        (n0, t0), (n1, t1) = pts[-2], pts[-1]
        return t1 + (t1 - t0) * (num_tokens - n1) / (n1 - n0)


def roofline_step_time(model_spec: object, hardware: object, context: int, w_bytes: float = 2,
                       kv_bytes: Optional[float] = None) -> StepTime:
    """t(n) from the roofline bound of a decode step of n tokens at `context` (kvserve.bench.roofline):
    max(compute, memory) with weights read once, so flat while memory-bound, then linear."""
    from kvserve.bench.roofline import decode_step_bound

    def t(num_tokens: int) -> float:
        return decode_step_bound(model_spec, hardware, max(num_tokens, 1), context, w_bytes,  # type: ignore[arg-type]
                                 kv_bytes).time_s
    return t


# ------------------------------------------------------------------ the choice
def expected_tokens(rates: Sequence[float], k: int) -> float:
    """E(k) = 1 + sum_{j<=k} prod_{l<=j} rates[l-1]: tokens emitted by a step drafting k."""
    total, prob = 1.0, 1.0
    for j in range(k):
        prob *= rates[j]
        total += prob
    return total


def _clamp01(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def choose_spec_lengths(rates: Sequence[Sequence[float]], max_k: Sequence[int], step_time: StepTime,
                        base_tokens: int = 0, draft_token_s: float = 0.0, draft_fixed_s: float = 0.0,
                        weights: Optional[Sequence[float]] = None) -> list[int]:
    """k_i per request maximising goodput (module docstring).

    rates[i][l-1]: conditional acceptance rate at draft position l (needs >= max_k[i] entries).
    max_k[i]: most drafts request i can take (proposal length, tokens left, the configured K).
    base_tokens: other tokens in the step.  draft_token_s / draft_fixed_s: proposal cost per
    draft token / once per step that speculates at all.  weights[i] (default 1): the value
    of one of request i's tokens (an SLO-aware scheduler can raise a late request's weight);
    the optimum stays exact since weighted increments are still non-increasing per request.
    Ties go to less speculation.
    """
    if len(rates) != len(max_k):
        raise ValueError(f"{len(rates)} rate lists for {len(max_k)} requests")
    w = [1.0] * len(max_k) if weights is None else [float(x) for x in weights]
    if len(w) != len(max_k) or any(x < 0 for x in w):
        raise ValueError(f"need one weight >= 0 per request, got {weights!r}")
    incs: list[tuple[float, int, int]] = []  # (-gain, request, position): sort = best first, stable
    for i, (r, m) in enumerate(zip(rates, max_k)):
        if m < 0 or m > len(r):
            raise ValueError(f"request {i}: max_k={m} but {len(r)} acceptance rates")
        prob = 1.0
        for j in range(m):
            prob *= _clamp01(r[j])
            incs.append((-w[i] * prob, i, j))
    incs.sort()
    B = len(max_k)
    emitted = sum(w)
    best_s, best_goodput = 0, emitted / step_time(base_tokens + B) if B else 0.0
    for s, (neg_gain, _, _) in enumerate(incs, start=1):
        emitted -= neg_gain
        t = step_time(base_tokens + B + s) + draft_fixed_s + draft_token_s * s
        goodput = emitted / t
        if goodput > best_goodput * (1 + 1e-12):
            best_s, best_goodput = s, goodput
    ks = [0] * B
    for _, i, _ in incs[:best_s]:
        ks[i] += 1
    return ks


def choose_joint_length(rates: Sequence[Sequence[float]], max_k: Sequence[int], step_time: StepTime,
                        base_tokens: int = 0, draft_token_s: float = 0.0, draft_fixed_s: float = 0.0) -> int:
    """One k for a set of requests whose tokens pay only together: a closed batch's critical set.

    When nobody waits and nobody will arrive, the batch lasts as long as its longest requests
    (the most tokens left, tied: the critical set C).  A step is saved for the batch only if
    every request of C gains, so a step drafting k for each of them advances the batch's end by
    1 + E[min_i a_i] = 1 + sum_{j<=k} prod_{i in C} prod_{l<=j} rates[i][l-1] (independent
    acceptances); the others drafting only finish sooner, which on weight-bound steps saves
    nothing.  Returns the k (0 = none) maximising that advance per second:
    (1 + gain(k)) / (t(base + |C| (k + 1)) + draft cost); ties go to less speculation.
    For one request it is `choose_spec_lengths` of that request.
    """
    if len(rates) != len(max_k):
        raise ValueError(f"{len(rates)} rate lists for {len(max_k)} requests")
    if not max_k:
        return 0
    for i, (r, m) in enumerate(zip(rates, max_k)):
        if m < 0 or m > len(r):
            raise ValueError(f"request {i}: max_k={m} but {len(r)} acceptance rates")
    n = len(max_k)
    probs = [1.0] * n
    advance = 1.0
    best_k, best = 0, 1.0 / step_time(base_tokens + n)
    for k in range(1, min(max_k) + 1):
        joint = 1.0
        for i in range(n):
            probs[i] *= _clamp01(rates[i][k - 1])
            joint *= probs[i]
        advance += joint
        rate = advance / (step_time(base_tokens + n * (k + 1)) + draft_fixed_s + draft_token_s * n * k)
        if rate > best * (1 + 1e-12):
            best_k, best = k, rate
    return best_k


# ------------------------------------------------------------------ acceptance estimates
@dataclass
class AcceptanceTracker:
    """Per-position acceptance rates as exponential moving averages, per request and overall.

    After a step that drafted k tokens of which a were accepted, positions
    1..a saw an acceptance and position a+1 (if a < k) a rejection; later
    positions were not tried and are not updated (the rates are conditional).
    A new request starts from the overall rates, which start from `prior`.

    Exploration: a rate is only measured while it is used, so a request whose
    estimate fell (or started) too low to be worth drafting would never be
    measured again.  `relax` moves the untried positions' rates a step
    (`recovery`) toward the optimistic `prior`, so an idle request is retried
    after a while, but only when the load makes drafting at the prior worth
    it: at high load, where even the prior gives k = 0, it costs nothing.
    """

    max_k: int
    ema: float = 0.2  # weight of the newest observation
    prior: float = 0.8  # optimistic: a request is tried before it is judged
    recovery: float = 0.02  # per untried step, toward the prior (~80 steps from 0.3 to 0.7)
    overall: list[float] = field(default_factory=list)
    _per_request: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.max_k, int) or self.max_k < 1:
            raise ValueError(f"max_k must be an integer >= 1, got {self.max_k!r}")
        if not 0.0 < self.ema <= 1.0:
            raise ValueError(f"ema must be in (0, 1], got {self.ema!r}")
        if not 0.0 <= self.prior <= 1.0:
            raise ValueError(f"prior must be in [0, 1], got {self.prior!r}")
        if not 0.0 <= self.recovery <= 1.0:
            raise ValueError(f"recovery must be in [0, 1], got {self.recovery!r}")
        if not self.overall:
            self.overall = [self.prior] * self.max_k

    def rates(self, request_id: str) -> list[float]:
        r = self._per_request.get(request_id)
        return list(r) if r is not None else list(self.overall)

    def observe(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        if not 0 <= num_accepted <= num_drafted <= self.max_k:
            raise ValueError(f"need 0 <= accepted ({num_accepted}) <= drafted ({num_drafted}) <= {self.max_k}")
        r = self._per_request.setdefault(request_id, list(self.overall))
        w = self.ema
        tried = min(num_accepted + 1, num_drafted)
        for j in range(tried):
            x = 1.0 if j < num_accepted else 0.0
            r[j] += w * (x - r[j])
            self.overall[j] += w * (x - self.overall[j])

    def relax(self, request_id: str, from_position: int = 0) -> None:
        """Positions >= from_position (0-based) were available but not drafted this step."""
        r = self._per_request.setdefault(request_id, list(self.overall))
        for j in range(from_position, self.max_k):
            r[j] += self.recovery * (self.prior - r[j])

    def remove(self, request_id: str) -> None:
        self._per_request.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._per_request)


class SpecLengthPolicy:
    """The per-step choice: fixed k (`adaptive=False`) or goodput-maximising k per request."""

    def __init__(self, max_k: int, step_time: Optional[StepTime] = None, adaptive: bool = True,
                 tracker: Optional[AcceptanceTracker] = None, draft_token_s: float = 0.0,
                 draft_fixed_s: float = 0.0) -> None:
        if adaptive and step_time is None:
            raise ValueError("adaptive speculation needs a step-time model")
        self.max_k = max_k
        self.step_time = step_time
        self.adaptive = adaptive
        self.tracker = tracker if tracker is not None else AcceptanceTracker(max_k)
        self.draft_token_s = draft_token_s
        self.draft_fixed_s = draft_fixed_s

    def choose(self, candidates: Sequence[tuple[str, int]], base_tokens: int = 0, jointly: bool = False,
               weights: Optional[Sequence[float]] = None) -> list[int]:
        """candidates: (request id, most drafts it can take); returns k per candidate.
        jointly: the candidates gain only together (a closed batch's critical set,
        `choose_joint_length`): one k for all of them.  weights: what one token of each
        candidate is worth (`choose_spec_lengths`; SLO-aware, from the scheduler side).
        Call once per step: positions offered but not drafted relax toward the prior."""
        caps = [max(0, min(m, self.max_k)) for _, m in candidates]
        if not self.adaptive:
            return caps
        assert self.step_time is not None
        rates = [self.tracker.rates(rid) for rid, _ in candidates]
        if jointly:
            k = choose_joint_length(rates, caps, self.step_time, base_tokens, self.draft_token_s, self.draft_fixed_s)
            ks = [k] * len(candidates)
        else:
            ks = choose_spec_lengths(rates, caps, self.step_time, base_tokens, self.draft_token_s, self.draft_fixed_s,
                                     weights)
        for (rid, _), k, cap in zip(candidates, ks, caps):
            if k < cap:
                self.tracker.relax(rid, from_position=k)  # exploration: see AcceptanceTracker
        return ks

    def observe(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        if num_drafted:
            self.tracker.observe(request_id, num_drafted, num_accepted)

    def remove(self, request_id: str) -> None:
        self.tracker.remove(request_id)
