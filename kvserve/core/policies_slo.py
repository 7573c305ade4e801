"""`slo`: goodput-first scheduling (requests meeting their TTFT/TPOT targets per second).

* Waiting order, by slack: `deadline - now - estimated prefill time`, where the deadline
  is `arrival + ttft` (the request's SLO, else the policy's default; no target = no
  deadline, served after every request with one).  Least slack first (earliest
  deadline first, corrected for how long the prompt takes).
* A request that can no longer meet its TTFT (negative slack) is deprioritised behind
  every request that still can: serving it late gains nothing, and serving it first
  makes others miss too.  With `reject=True` a request that cannot meet its TTFT at
  arrival is refused (`check_admission` -> AdmissionRejected, a 429 in the server).
* Age bound: a request waiting longer than `max_wait_s` goes first, in arrival order,
  whatever its slack, so none starves (deprioritised and no-deadline ones included).
* Chunk sizing: while running requests have TPOT targets, the step's token budget is
  what the step-time model says fits in the time the tightest of them has to spare
  (never less than the decodes plus `prefill_floor()`: `min_prefill_chunk`, and at least
  the tokens that cost as much as a step's fixed time), so long prompts are chunked
  instead of stalling decodes past their TPOT.  A TPOT target bounds the *mean* time
  per output token ((last - first token) / (n - 1), as benchmarks measure it), so the
  time to spare is `first_token_time + tpot * num_output_tokens - now`: a request ahead
  of its pace banks the difference, and a long prefill chunk may spend it.  (Bounding
  every step by the TPOT itself chopped prompts into small chunks on CPUs, where each
  step re-reads all the weights, and cost a third of the throughput.)  Only TPOTs that can
  still count hold the step back: not a request that already missed its TTFT (its SLO is
  lost), nor one whose deficit even the quickest steps could not make up over its
  remaining `max_tokens` (`tpot_savable`), as only feasible TTFTs go first.
* Seats: when every seat is taken and the head of the queue can still meet its TTFT,
  it displaces the running request with the latest next deadline, provided that one
  has nothing left to lose (its first token is out and it has no TPOT target) or can
  lose its progress and still meet its next deadline after the head's (`displace`), and
  has not been preempted before (each displacement throws the victim's computed tokens
  away: at most one redo per request).
  Without this, requests with loose targets occupying every seat make every tight
  TTFT wait for a request to finish.
* Victim: the running request with the latest next deadline (most slack).

The step-time model is `seconds = base_s + per_token_s * tokens`; it starts from
given coefficients (the engine derives them from the roofline bound of the model on
the device) and is refit online from measured steps (`observe_step`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from kvserve.core.clock import Clock, wall_clock
from kvserve.core.policies import AdmissionRejected, SchedulingPolicy, _is_prefilling
from kvserve.request import Request

INF = math.inf


@dataclass
class StepTimeModel:
    """`seconds = base_s + per_token_s * tokens`, refit from measured steps by
    exponentially weighted least squares (weight `decay` per observation)."""

    base_s: float = 0.005
    per_token_s: float = 1e-5
    decay: float = 0.98
    min_observations: int = 8

    def __post_init__(self) -> None:
        if not (self.base_s >= 0 and self.per_token_s > 0):
            raise ValueError(f"step-time model needs base_s >= 0 and per_token_s > 0, got {self}")
        self._n = 0
        self._s = [0.0] * 5  # sum w, w*x, w*y, w*x*x, w*x*y

    def step_s(self, num_tokens: int) -> float:
        return self.base_s + self.per_token_s * max(0, num_tokens)

    def prefill_s(self, num_tokens: int, chunk: int) -> float:
        """Time to run `num_tokens` prompt tokens in chunks of at most `chunk` tokens."""
        if num_tokens <= 0:
            return 0.0
        steps = -(-num_tokens // max(1, chunk))
        return steps * self.base_s + self.per_token_s * num_tokens

    def tokens_within(self, seconds: float) -> int:
        """The most tokens one step can hold and still take at most `seconds`."""
        return max(0, int((seconds - self.base_s) / self.per_token_s + 1e-9))  # 1e-9: float rounding

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or not seconds > 0:
            return
        d, x, y = self.decay, float(num_tokens), seconds
        s = self._s
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            s[i] = s[i] * d + v
        self._n += 1
        if self._n < self.min_observations:
            return
        w, sx, sy, sxx, sxy = s
        var = sxx * w - sx * sx
        if var <= 1e-9 * max(1.0, sxx * w):
            return  # every step had the same size: the slope is not identifiable
        slope = (sxy * w - sx * sy) / var
        base = (sy - slope * sx) / w
        if slope > 0:
            self.per_token_s = slope
            self.base_s = max(0.0, base)


class SLOPolicy(SchedulingPolicy):
    """Least slack to the TTFT deadline first; TPOT-aware chunking; an age bound (module doc)."""

    name = "slo"

    def __init__(self, clock: Clock = wall_clock, step_model: Optional[StepTimeModel] = None,
                 default_ttft_s: Optional[float] = None, default_tpot_s: Optional[float] = None,
                 max_wait_s: float = 60.0, reject: bool = False, chunk_tokens: int = 2048,
                 min_prefill_chunk: int = 16) -> None:
        super().__init__(clock)
        self.model = step_model or StepTimeModel()
        self.default_ttft_s = default_ttft_s
        self.default_tpot_s = default_tpot_s
        self.max_wait_s = max_wait_s
        self.reject = reject
        self.chunk_tokens = chunk_tokens
        self.min_prefill_chunk = min_prefill_chunk
        self._waiting: list[Request] = []
        self.num_rejected = 0

    # ---------------------------------------------------------------- targets
    def ttft_s(self, r: Request) -> Optional[float]:
        return r.slo.ttft_s if r.slo is not None and r.slo.ttft_s is not None else self.default_ttft_s

    def tpot_s(self, r: Request) -> Optional[float]:
        return r.slo.tpot_s if r.slo is not None and r.slo.tpot_s is not None else self.default_tpot_s

    def slack(self, r: Request, now: float) -> float:
        """Seconds to spare before the TTFT deadline if its prefill started now (inf: no target)."""
        ttft = self.ttft_s(r)
        if ttft is None or r.first_token_time is not None:
            return INF
        remaining = r.num_tokens - r.num_computed_tokens
        return r.arrival_time + ttft - now - self.model.prefill_s(remaining, self.chunk_tokens)

    def _key(self, r: Request, now: float) -> tuple[int, float, float]:
        if now - r.arrival_time > self.max_wait_s:
            return (0, r.arrival_time, 0.0)  # aged: arrival order before anything else
        s = self.slack(r, now)
        if s < 0:
            return (2, r.arrival_time, 0.0)  # cannot make it any more: behind every feasible one
        return (1, s, r.arrival_time)

    # ------------------------------------------------------- waiting queue
    def add(self, request: Request) -> None:
        self._waiting.append(request)

    def add_preempted(self, request: Request) -> None:
        self._waiting.append(request)  # its slack puts it in place

    def peek(self) -> Optional[Request]:
        if not self._waiting:
            return None
        now = self.clock()
        return min(self._waiting, key=lambda r: self._key(r, now))

    def pop(self) -> Request:
        r = self.peek()
        if r is None:
            raise IndexError("pop from an empty queue")
        self._waiting.remove(r)
        return r

    def remove(self, request: Request) -> None:
        self._waiting.remove(request)

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[Request]:
        now = self.clock()
        return iter(sorted(self._waiting, key=lambda r: self._key(r, now)))

    # ------------------------------------------------------- running order
    def order_running(self, running: Sequence[Request]) -> list[Request]:
        now = self.clock()
        return sorted(running, key=lambda r: (_is_prefilling(r), self.slack(r, now)))

    def _next_deadline(self, r: Request) -> float:
        if r.first_token_time is None:
            ttft = self.ttft_s(r)
            return INF if ttft is None else r.arrival_time + ttft
        tpot = self.tpot_s(r)
        return INF if tpot is None else r.first_token_time + tpot * r.num_output_tokens

    def victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=lambda r: (self._next_deadline(r), r.arrival_time))

    # ------------------------------------------------------------ budgets
    def tpot_spare_s(self, r: Request, now: float) -> float:
        """Seconds request `r` may wait for its next token and keep its mean TPOT on target
        (inf: no TPOT target or no first token yet)."""
        tpot = self.tpot_s(r)
        if tpot is None or r.first_token_time is None:
            return INF
        return r.first_token_time + tpot * r.num_output_tokens - now

    def tpot_savable(self, r: Request, now: float, min_step_s: float) -> bool:
        """Whether keeping `r`'s TPOT can still count: its TTFT was met (a request that missed it
        misses its SLO whatever its TPOT), and it can catch up on a deficit with steps of
        `min_step_s` for the tokens it has left (max_tokens; unknown: assumed it can)."""
        return self._savable(r, self.tpot_spare_s(r, now), min_step_s)

    def _savable(self, r: Request, spare_s: float, min_step_s: float) -> bool:
        """tpot_savable, given `r`'s tpot_spare_s."""
        ttft = self.ttft_s(r)
        if ttft is not None and r.first_token_time is not None and r.first_token_time - r.arrival_time > ttft:
            return False
        if spare_s >= 0:
            return True  # on pace or ahead (no TPOT target: inf)
        tpot = self.tpot_s(r)
        left = None if r.sampling_params.max_tokens is None else r.sampling_params.max_tokens - r.num_output_tokens
        if tpot is None or left is None:
            return True
        return -spare_s <= left * (tpot - min_step_s)

    def step_token_budget(self, running: Sequence[Request], budget: int) -> int:
        now = self.clock()
        decodes = sum(1 for r in running if not _is_prefilling(r))
        min_step = self.model.step_s(decodes)
        # Only TPOTs that can still count constrain the step (as only feasible TTFTs go first).
        spares = ((r, self.tpot_spare_s(r, now)) for r in running)
        spare = min((s for r, s in spares if self._savable(r, s, min_step)), default=INF)
        if spare == INF:
            return budget
        fits = self.model.tokens_within(spare)
        return min(budget, max(fits, decodes + self.prefill_floor()))

    def prefill_floor(self) -> int:
        """The fewest prompt tokens a TPOT-bound step still takes: `min_prefill_chunk`, and at
        least as many as cost one step's fixed time (`base_s / per_token_s`), so such a step
        spends at least half its time on tokens.  On a CPU the fixed part (every weight read
        once) is large: 16-token chunks there cost most of the throughput that TTFTs need."""
        return max(self.min_prefill_chunk, int(self.model.base_s / self.model.per_token_s))

    def displace(self, head: Request, running: Sequence[Request]) -> Optional[Request]:
        """A seat for a head that can still meet its TTFT (module doc, "Seats")."""
        if not running:
            return None
        now = self.clock()
        rank, slack, _ = self._key(head, now)
        if rank != 1 or slack == INF:
            return None  # aged heads are not urgent by deadline; infeasible or untargeted ones gain nothing
        victim = self.victim(running)
        if victim.num_preemptions > 0:
            return None  # once only: each displacement throws its computed tokens away; this bounds the redo
        due = self._next_deadline(victim)
        if due == INF:
            return victim  # first token out, no TPOT target: losing its seat costs it no target
        if victim.first_token_time is not None:
            return None  # decoding against a TPOT target: a preemption stalls it
        head_due = head.arrival_time + (self.ttft_s(head) or 0.0)
        # Its prefill starts over after the head's: both must still fit before its deadline.
        redo = self.model.prefill_s(victim.num_tokens, self.chunk_tokens)
        return victim if due - max(now, head_due) > redo else None

    def check_admission(self, request: Request) -> None:
        if not self.reject:
            return
        ttft = self.ttft_s(request)
        if ttft is None:
            return
        now = self.clock()
        mine = self._key(request, now)
        ahead = sum(r.num_tokens - r.num_computed_tokens for r in self._waiting if self._key(r, now) <= mine)
        eta = self.model.prefill_s(ahead + request.num_tokens, self.chunk_tokens)
        if request.arrival_time + ttft < now + eta:
            self.num_rejected += 1
            raise AdmissionRejected(
                f"the request cannot meet its time-to-first-token target of {ttft * 1000:.0f} ms "
                f"(estimated {(now + eta - request.arrival_time) * 1000:.0f} ms with {ahead} queued prompt "
                "tokens ahead); retry later or relax slo_ttft_ms", retry_after_s=max(1.0, eta))

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.model.observe_step(num_tokens, seconds)
