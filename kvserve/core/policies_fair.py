"""`fair`: the Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language
Models", OSDI'24), as a scheduling policy.

Each tenant has a counter of the service it received, in weighted tokens:

    counter[t] += (w_prefill * prompt tokens + w_decode * decoded tokens) / weight[t]

Admission serves the tenant with the *smallest* counter (its earliest waiting request
first); preemption takes from the tenant with the largest.  Two rules make the bound
of the paper hold (a backlogged tenant's service lags any other backlogged tenant's
by at most a constant, so a tenant that floods cannot delay another beyond it):

* counter lift: when a tenant with nothing waiting sends a request, its counter is
  raised to the smallest counter among tenants that have requests waiting (or, when
  nobody waits, to the counter of the tenant served last).  Idle time earns no credit;
* accounting is on tokens actually served: a prompt is charged once when its request
  is first admitted (recomputation after a preemption is not charged again: the
  tenant did not ask for it), every decoded token when it is scheduled.

Beyond VTC (which orders admission only, so a tenant that finds every seat taken, or every
step filled by another tenant's long prompts, still waits), three rules bound what a flooding
tenant does to a tenant *below its weighted share of the seats* (`max_num_seqs`) -- a
*protected* tenant, one with prompt work a whole seat below its share:

* it is admitted first, and a waiting request of it displaces the latest request of the
  tenant most over its share when every seat is taken (displace);
* while it has prompt work, the other tenants' prefill chunks sit the step out and the step
  is cut to the decodes plus that work (order_running, step_token_budget), so its prompt
  runs at once in a short step instead of sharing a full one;
* its seats are never taken back by the counter-lead displacement (no ping-pong).

And one for every tenant: while two or more have requests, a step is cut to what takes
`contended_step_s` (0.2 s) by the measured step time (the `slo` policy's StepTimeModel), since
a request arriving mid-step waits the step out, and on a CPU a full step of prompts lasts
seconds (docs/scheduling.md, session 16).

These rules (and the victim choice) read a second per-tenant number, its *service*: the
same charges as the counter, but a lift raises it only to `lift_credit` below the floor.
The lift (VTC) makes a tenant that is below its share level with the flooding tenant at each
new request, and its prompt charge then puts it ahead; measured on that lifted counter, a
light tenant looked "ahead" after every burst of two or three prompts and lost its
protection (most often with a weight on the flooding tenant, whose weighted counter then
takes twice as long to catch up: light TTFT p50 2.21x of alone).  The service keeps up to
`lift_credit` of the idle credit the counter forgets, so a tenant below its share stays
protected through such bursts; a tenant backlogged all along is never lifted and its
service equals its counter (the rules behave as on the counters: no ping-pong).

A tenant at or above its share gets none of this; among those, VTC's counters decide.  In
the simulator (docs/scheduling.md) this keeps a light tenant's TTFT within about 1.3x of its
TTFT alone next to a tenant flooding at 4x its rate (with equal weights and with weight 2 on
the flooding tenant), and backlogged tenants' service in the ratio of their weights.

Requests without a tenant are accounted to the tenant None (one shared tenant).
Weights are per tenant (default 1.0); w_prefill=1, w_decode=2 as in the paper's
experiments (an output token costs about twice an input token).
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Iterable, Iterator, Mapping, Optional, Sequence

from kvserve.config import parse_tenant_weights  # noqa: F401  (re-exported)
from kvserve.core.clock import Clock, wall_clock
from kvserve.core.policies import SchedulingPolicy, _is_prefilling
from kvserve.core.policies_slo import StepTimeModel
from kvserve.request import Request

Tenant = Optional[str]


class VTCPolicy(SchedulingPolicy):
    """Least-served tenant first, by virtual token counters (module doc)."""

    name = "fair"

    def __init__(self, clock: Clock = wall_clock, tenant_weights: Optional[Mapping[str, float]] = None,
                 w_prefill: float = 1.0, w_decode: float = 2.0, displace_threshold: float = 2048.0,
                 protect_prefill: bool = True, lift_credit: float = 6144.0,
                 contended_step_s: float = 0.2, step_model: Optional[StepTimeModel] = None) -> None:
        super().__init__(clock)
        if not contended_step_s >= 0:
            raise ValueError(f"contended_step_s must be >= 0 seconds (0: off), got {contended_step_s!r}")
        # While two or more tenants have requests, a step holds at most the tokens that take
        # this long by the measured step time (step_token_budget): a request arriving mid-step
        # waits for the step in progress, so the step's length bounds what another tenant's
        # prompts add to its TTFT.  0: the configured budget.
        self.contended_step_s = contended_step_s
        self.model = step_model or StepTimeModel()
        # How far below the lift's floor a tenant's service (module doc) may stay; 6144 weighted
        # tokens is a burst of about three long prompts (docs/scheduling.md has the sweep).
        self.lift_credit = lift_credit
        # Prompt work of a tenant below its seat share runs in short steps of its own
        # (order_running, step_token_budget).
        self.protect_prefill = protect_prefill
        # With every seat taken, a waiting request preempts a running one of a tenant whose
        # counter is more than this ahead of its own (hysteresis: no ping-pong between two
        # tenants with close counters).
        self.displace_threshold = displace_threshold
        self.weights = dict(tenant_weights or {})
        self.w_prefill = w_prefill
        self.w_decode = w_decode
        self.counters: dict[Tenant, float] = {}
        # The counters' charges with a bounded lift: what the protection, displacement and
        # victim rules compare (module doc).  A backlogged tenant's equals its counter.
        self.service: dict[Tenant, float] = {}
        # Per tenant, its waiting requests in arrival order (preempted ones in front).
        self._queues: dict[Tenant, deque[Request]] = {}
        self._len = 0
        self._last_served: Tenant = None
        # Tenants protected at the start of the current step (order_running and
        # step_token_budget, which the scheduler calls first, refresh it); admitted first.
        self._protected_now: set[Tenant] = set()
        self._admitted_now: list[Request] = []  # popped since the step started (now seated)
        self._seq = itertools.count()
        self._served_seq: dict[Tenant, int] = {}  # tenant -> when it was last admitted (tie-break)
        self._charged: set[str] = set()  # requests whose prompt was charged
        # The request the last peek returned.  pop returns it: between the scheduler's peek
        # and pop a displacement re-queues its victim, whose tenant may now come first, and
        # popping that one instead would seat the peeked request while it stays queued and
        # lose the victim (in no queue: an abort of it raised ValueError).
        self._peeked: Optional[Request] = None

    def weight(self, tenant: Tenant) -> float:
        return self.weights.get(tenant, 1.0) if tenant is not None else 1.0

    def _charge(self, tenant: Tenant, cost: float) -> None:
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / self.weight(tenant)
        self.service[tenant] = self.service.get(tenant, 0.0) + cost / self.weight(tenant)

    # ------------------------------------------------------- waiting queue
    def add(self, request: Request) -> None:
        t = request.tenant
        q = self._queues.get(t)
        if not q:
            self._lift(t)
        self._queues.setdefault(t, deque()).append(request)
        self._len += 1

    def _lift(self, tenant: Tenant) -> None:
        """VTC's rule for a tenant becoming active: no credit for the time it was idle."""
        waiting = [self.counters.get(u, 0.0) for u, q in self._queues.items() if q and u != tenant]
        # Nobody else waits: the counter of the tenant served last (0 before any service).
        floor = min(waiting) if waiting else self.counters.get(self._last_served, 0.0)
        self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self.service[tenant] = max(self.service.get(tenant, 0.0), floor - self.lift_credit)

    def add_preempted(self, request: Request) -> None:
        # Back to the front of its tenant's queue; no lift (it never left the system).
        self._queues.setdefault(request.tenant, deque()).appendleft(request)
        self._len += 1

    def _head_tenant(self) -> Optional[Tenant]:
        best: Optional[tuple[float, int, float]] = None
        best_t: Optional[Tenant] = None
        found = False
        # A tenant below its seat share (as of this step's start) is admitted first: with
        # every seat taken, the head is the only request that may displace one, and a
        # flooding tenant's head (its counter just below the light tenant's, which was
        # charged a prompt) would wait for a free seat and hold the light one back.
        first = {t for t in self._protected_now if self._queues.get(t)}
        for t, q in self._queues.items():
            if not q or (first and t not in first):
                continue
            # Ties (a lifted tenant is level with the least-served one) go round-robin: the
            # tenant served longest ago first, else a newly active tenant would wait behind
            # the backlog it was lifted to.
            key = (self.counters.get(t, 0.0), self._served_seq.get(t, -1), q[0].arrival_time)
            if best is None or key < best:
                best, best_t, found = key, t, True
        return best_t if found else None

    def peek(self) -> Optional[Request]:
        if not self._len:
            return None
        self._peeked = self._queues[self._head_tenant()][0]
        return self._peeked

    def pop(self) -> Request:
        """The request the last peek returned, if still queued (see `_peeked`), else the head."""
        if not self._len:
            raise IndexError("pop from an empty queue")
        request, self._peeked = self._peeked, None
        if request is not None and request in self._queues.get(request.tenant, ()):
            t = request.tenant
            self._queues[t].remove(request)
        else:
            t = self._head_tenant()
            request = self._queues[t].popleft()
        self._len -= 1
        self._last_served = t
        self._served_seq[t] = next(self._seq)
        self._admitted_now.append(request)
        if request.request_id not in self._charged:
            # The prompt is charged when first admitted (VTC charges at dispatch), so the
            # next admission of the same step already sees this tenant's new counter.
            self._charged.add(request.request_id)
            self._charge(t, self.w_prefill * request.num_prompt_tokens)
        return request

    def remove(self, request: Request) -> None:
        self._queues[request.tenant].remove(request)
        self._len -= 1
        if self._peeked is request:
            self._peeked = None

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Request]:
        # Service order if counters stood still: by (counter, arrival), tenants interleaved.
        # (protected tenants first, as in _head_tenant).
        items = [(t not in self._protected_now, self.counters.get(t, 0.0), i, self._served_seq.get(t, -1), r)
                 for t, q in self._queues.items() for i, r in enumerate(q)]
        return (e[4] for e in sorted(items, key=lambda e: (e[0], e[1], e[2], e[3], e[4].arrival_time)))

    # ------------------------------------------- running order and step budget
    def _seat_over(self, running: Sequence[Request], tenants: set[Tenant]) -> dict[Tenant, float]:
        """Per tenant of `tenants` and those seated: its seats minus its weighted share of the
        `len(running)` seats (negative: below its share)."""
        seats: dict[Tenant, int] = {}
        for r in running:
            seats[r.tenant] = seats.get(r.tenant, 0) + 1
        everyone = set(seats) | tenants
        total_w = sum(self.weight(t) for t in everyone)
        return {t: seats.get(t, 0) - len(running) * self.weight(t) / total_w for t in everyone}

    def _protected(self, running: Sequence[Request]) -> set[Tenant]:
        """Tenants a whole seat below their weighted seat share (among the tenants seated or
        waiting) that have prompt work: a waiting request or a running prefill chunk."""
        if not self.protect_prefill or not running:
            return set()
        waiting = {t for t, q in self._queues.items() if q}
        with_work = waiting | {r.tenant for r in running if _is_prefilling(r)}
        if len(with_work | {r.tenant for r in running}) < 2:
            return set()  # one tenant: nobody to protect it from
        over = self._seat_over(running, waiting)
        return {t for t in with_work if over[t] < -1.0 + 1e-9 and not self._ahead(t, over)}

    def _ahead(self, tenant: Tenant, active: Iterable[Tenant]) -> bool:
        """Its service leads the least-served active tenant's counter by more than
        displace_threshold: it has had more than its service already, so seats are not given
        it out of turn (else a backlogged light tenant would run ahead of VTC's order and the
        two displacement rules would hand seats back and forth)."""
        least = min(self.counters.get(u, 0.0) for u in active)
        return self.service.get(tenant, 0.0) - least > self.displace_threshold

    def _refresh_protected(self, running: Sequence[Request]) -> set[Tenant]:
        self._admitted_now = []  # a new step starts
        self._peeked = None
        self._protected_now = self._protected(running)
        return self._protected_now

    def order_running(self, running: Sequence[Request]) -> list[Request]:
        """Decodes first (stall-free, as the default), then prefill chunks, least-served
        tenant first.  While a tenant below its seat share has prompt work (`_protected`),
        other tenants' prefill chunks sit this step out (they keep their blocks): a flooding
        tenant's long prompts would otherwise fill every step, and a light tenant's prompt
        would wait a whole full step for its first token."""
        protected = self._refresh_protected(running)

        def key(r: Request) -> tuple[int, float]:
            return (1, self.counters.get(r.tenant, 0.0)) if _is_prefilling(r) else (0, 0.0)

        ordered = sorted(running, key=key)  # stable: admission order within a tenant
        if protected:
            ordered = [r for r in ordered if not _is_prefilling(r) or r.tenant in protected]
        return ordered

    def step_token_budget(self, running: Sequence[Request], budget: int) -> int:
        """With protected prompt work (order_running), the step is cut to the decodes plus that
        work, so the light tenant's prefill runs in a short step, not a full one.  While two
        or more tenants have requests, the step is also cut to what takes contended_step_s
        (or twice the decodes' own step time, and never below the decodes plus one prompt
        token): on a CPU a full step of another tenant's prompts lasts seconds, and a request
        that arrives during it waits it out."""
        protected = self._refresh_protected(running)
        decodes = sum(1 for r in running if not _is_prefilling(r))
        if protected:
            work = sum(r.num_tokens - r.num_computed_tokens for r in running
                       if r.tenant in protected and _is_prefilling(r))
            work += sum(r.num_tokens - r.num_computed_tokens for t in protected for r in self._queues.get(t, ()))
            budget = min(budget, decodes + work)
        if self.contended_step_s > 0 and self._contended(running):
            # At least twice the decodes' own step: below that, prompts crawl in chunks of a few
            # tokens and every TTFT grows (measured: 50 ms on a 2-core CPU, docs/scheduling.md).
            cap_s = max(self.contended_step_s, 2 * self.model.step_s(decodes))
            budget = min(budget, max(decodes + 1, self.model.tokens_within(cap_s)))
        return max(1, budget)

    def _contended(self, running: Sequence[Request]) -> bool:
        """Two or more tenants have requests seated or waiting."""
        tenants = {r.tenant for r in running} | {t for t, q in self._queues.items() if q}
        return len(tenants) >= 2

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        self.model.observe_step(num_tokens, seconds)

    # ---------------------------------------------------------- preemption
    def victim(self, candidates: Sequence[Request]) -> Request:
        # From the most-served tenant (by service: a tenant below its share, lifted level with
        # a flooding one and charged a prompt, is not the most served), its latest arrival.
        return max(candidates, key=lambda r: (self.service.get(r.tenant, 0.0), r.arrival_time))

    def displace(self, head: Request, running: Sequence[Request]) -> Optional[Request]:
        """Every seat is taken.  Two rules give `head` a seat (both beyond VTC's admission
        order, which alone cannot help a tenant that finds every seat taken):
        * seat share: its tenant holds fewer seats than its weighted share among the tenants
          seated or waiting here; the victim is the latest request of the tenant most over
          its share.  (The lift keeps a light tenant's counter level with a flooding one's,
          so counters alone would rarely differ enough; seats are what it waits for.)
        * counter lead: the most-served tenant's service leads the head's counter by more
          than `displace_threshold`, and that tenant is not below its seat share; the victim
          is its latest request."""
        if not running:
            return None
        # Shares count the requests admitted earlier in this step too (the scheduler offers
        # only older ones as victims): without them a run of displacements in one step makes
        # the displacing tenant look short of seats still, and the other one short next step.
        ids = {r.request_id for r in running}
        seated_now = list(running) + [r for r in self._admitted_now if r.request_id not in ids]
        over = self._seat_over(seated_now, {head.tenant})
        seated = {r.tenant for r in running}
        if over[head.tenant] < -1.0 + 1e-9 and not self._ahead(head.tenant, over):  # a whole seat below
            worst = max((t for t in seated if t != head.tenant), key=over.__getitem__, default=None)
            if worst is not None and over[worst] > 0:
                return max((r for r in running if r.tenant == worst), key=lambda r: r.arrival_time)
        victim = self.victim(running)
        lead = self.service.get(victim.tenant, 0.0) - self.counters.get(head.tenant, 0.0)
        if over[victim.tenant] < -1.0 + 1e-9:
            # Never from a tenant below its seat share: its counter leads because its prompts
            # were just charged, and taking its seat back would undo the rule above (ping-pong).
            return None
        return victim if victim.tenant != head.tenant and lead > self.displace_threshold else None

    # --------------------------------------------------------------- hooks
    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        start = request.num_computed_tokens
        # A decode step starts at the last committed token, past the prompt; with speculative
        # decoding it also runs drafts (num_tokens = 1 + drafts, each may become an output
        # token), charged as decodes too.  A prompt chunk was charged at admission; a
        # recompute of output tokens (it starts earlier) is not charged.
        if start >= request.num_prompt_tokens and start == request.num_tokens - 1:
            self._charge(request.tenant, self.w_decode * num_tokens)

    def on_finished(self, request: Request) -> None:
        self._charged.discard(request.request_id)

    def served_share(self) -> dict[Tenant, float]:
        """Each tenant's counter as a fraction of the total (for inspection and benchmarks)."""
        total = sum(self.counters.values())
        return {t: c / total for t, c in self.counters.items()} if total else {}
