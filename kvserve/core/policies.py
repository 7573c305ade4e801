"""Scheduling policies: objects that order both queues and pick preemption victims.

A policy *is* the waiting queue (add / add_preempted / peek / pop / remove,
iteration in service order), and it also decides

  order_running(running)  the order in which running requests get the step's budget;
  victim(candidates)      which running request loses its blocks when they run out;

and it may keep state across steps (per-tenant counters, deadlines) through
the hooks `on_scheduled` and `on_finished`, which the scheduler calls with
plain request state (`priority`, `tenant`, `slo`, arrival time, token counts).
Time comes from the injected clock, never from `time` directly.

Add one here and name it in `_REGISTRY` / `_policies` (SchedulerConfig.policy), or pass an
instance to `Scheduler(policy=...)`.
"""
from __future__ import annotations

import heapq
import inspect
import itertools
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, ClassVar, Iterator, Optional, Sequence

from kvserve.core.clock import Clock, wall_clock
from kvserve.request import Request


class AdmissionRejected(ValueError):
    """The policy refuses a request at arrival (the server answers 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _is_prefilling(request: Request) -> bool:
    """More than one token to compute: a prefill chunk (or a recompute), not a decode."""
    return request.num_tokens - request.num_computed_tokens > 1


class SchedulingPolicy(ABC):
    """The waiting queue in service order, the running order and the victim rule."""

    name: ClassVar[str] = "abstract"

    def __init__(self, clock: Clock = wall_clock) -> None:
        self.clock = clock

    # ------------------------------------------------------- waiting queue
    @abstractmethod
    def add(self, request: Request) -> None: ...

    @abstractmethod
    def add_preempted(self, request: Request) -> None:
        """Re-queue a preempted request so it resumes before later arrivals."""

    @abstractmethod
    def peek(self) -> Optional[Request]: ...

    @abstractmethod
    def pop(self) -> Request: ...

    @abstractmethod
    def remove(self, request: Request) -> None: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Request]: ...

    # ------------------------------------------------------- running order
    def order_running(self, running: Sequence[Request]) -> list[Request]:
        """Order in which running requests get the step's token budget.

        Default (stall-free batching, Sarathi-Serve): decodes first, then the
        unfinished prefill chunks, each group in admission order.
        """
        return sorted(running, key=_is_prefilling)

    # ---------------------------------------------------------- preemption
    @abstractmethod
    def victim(self, candidates: Sequence[Request]) -> Request:
        """The running request to preempt when blocks run out (`candidates` is never empty)."""

    # ---------------------------------------------------------------- targets
    def tpot_s(self, request: Request) -> Optional[float]:
        """`request`'s TPOT target in seconds (None: none): its own; `slo` adds a default."""
        return request.slo.tpot_s if request.slo is not None else None

    # --------------------------------------------------------------- hooks
    def on_scheduled(self, request: Request, num_tokens: int) -> None:
        """`request` runs `num_tokens` tokens in the step being built (for usage accounting)."""

    def on_finished(self, request: Request) -> None:
        """`request` finished (any reason) and left the scheduler."""

    def displace(self, head: Request, running: Sequence[Request]) -> Optional[Request]:
        """Every seat is taken and `head` waits: a running request to preempt for it, or None
        (the default: wait for a seat).  The scheduler counts it as cause "policy"."""
        return None

    # ------------------------------------------------------ budgets, admission
    def step_token_budget(self, running: Sequence[Request], budget: int) -> int:
        """The step's token budget given the running requests (default: the configured one)."""
        return budget

    def check_admission(self, request: Request) -> None:
        """Raise AdmissionRejected to refuse `request` at arrival (default: admit all)."""

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A step of `num_tokens` tokens took `seconds` (for policies with a step-time model)."""


class FCFSPolicy(SchedulingPolicy):
    """Arrival order; a preempted request goes back to the front."""

    name = "fcfs"

    def __init__(self, clock: Clock = wall_clock) -> None:
        super().__init__(clock)
        self._q: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._q.append(request)

    def add_preempted(self, request: Request) -> None:
        self._q.appendleft(request)

    def peek(self) -> Optional[Request]:
        return self._q[0] if self._q else None

    def pop(self) -> Request:
        return self._q.popleft()

    def remove(self, request: Request) -> None:
        self._q.remove(request)

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)

    def victim(self, candidates: Sequence[Request]) -> Request:
        # The latest arrival loses its blocks first.
        return max(candidates, key=lambda r: r.arrival_time)


class PriorityPolicy(SchedulingPolicy):
    """Lower `priority` value first, then earlier arrival."""

    name = "priority"

    def __init__(self, clock: Clock = wall_clock) -> None:
        super().__init__(clock)
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()
        self._removed: set[int] = set()  # ids of lazily removed entries

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.priority, request.arrival_time, next(self._counter), request))

    def add_preempted(self, request: Request) -> None:
        self.add(request)  # the ordering already puts it back in its place

    def _prune(self) -> None:
        while self._heap and id(self._heap[0][3]) in self._removed:
            self._removed.discard(id(heapq.heappop(self._heap)[3]))

    def peek(self) -> Optional[Request]:
        self._prune()
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Request:
        self._prune()
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> None:
        self._removed.add(id(request))

    def __len__(self) -> int:
        return len(self._heap) - len(self._removed)

    def __iter__(self) -> Iterator[Request]:
        return (e[3] for e in sorted(self._heap) if id(e[3]) not in self._removed)

    def victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=lambda r: (r.priority, r.arrival_time))

    def displace(self, head: Request, running: Sequence[Request]) -> Optional[Request]:
        # A strictly more important request takes the seat of the least important one (as vLLM).
        if not running:
            return None
        victim = self.victim(running)
        return victim if victim.priority > head.priority else None


_REGISTRY: dict[str, type[SchedulingPolicy]] = {"fcfs": FCFSPolicy, "priority": PriorityPolicy}


def _policies() -> dict[str, type[SchedulingPolicy]]:
    """The registry, with the policies of the other modules added on first use: they subclass
    SchedulingPolicy, so importing them here at load time made `import
    kvserve.core.policies_fair` (before this module) fail with a circular ImportError."""
    if "fair" not in _REGISTRY:
        from kvserve.core.policies_fair import VTCPolicy
        from kvserve.core.policies_slo import SLOPolicy
        _REGISTRY.update(fair=VTCPolicy, slo=SLOPolicy)
    return _REGISTRY


def __getattr__(name: str) -> Any:
    # PEP 562: `POLICIES` (name -> class) is built on first access.
    if name == "POLICIES":
        return _policies()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Older names.
WaitingQueue = SchedulingPolicy
FCFSQueue = FCFSPolicy
PriorityQueue = PriorityPolicy


def make_policy(policy: str, clock: Clock = wall_clock, **options: Any) -> SchedulingPolicy:
    """The named policy; `options` are its keyword arguments (those it does not take are
    dropped, so one set of engine options serves every policy)."""
    try:
        cls = _policies()[policy]
    except KeyError:
        raise ValueError(f"unknown scheduling policy {policy!r}; choose from {sorted(_policies())}") from None
    accepted = inspect.signature(cls.__init__).parameters
    return cls(clock, **{k: v for k, v in options.items() if k in accepted and v is not None})


def make_waiting_queue(policy: str) -> SchedulingPolicy:
    return make_policy(policy)
