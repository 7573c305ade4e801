"""Queue orderings for waiting requests, and the matching preemption victim rule.

A policy is a small ordering over plain request state; add one here and name
it in `SchedulerConfig.policy`.
"""
from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import deque
from typing import Iterator, Optional

from kvserve.request import Request


class WaitingQueue(ABC):
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

    @staticmethod
    @abstractmethod
    def victim(running: list[Request]) -> Request:
        """The running request to preempt when blocks run out."""


class FCFSQueue(WaitingQueue):
    def __init__(self) -> None:
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

    @staticmethod
    def victim(running: list[Request]) -> Request:
        # The latest arrival loses its blocks first.
        return max(running, key=lambda r: r.arrival_time)


class PriorityQueue(WaitingQueue):
    """Lower `priority` value first, then earlier arrival."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()
        self._removed: set[int] = set()  # ids of lazily removed entries

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.priority, request.arrival_time, next(self._counter), request))

    add_preempted = add  # the ordering already puts it back in its place

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

    @staticmethod
    def victim(running: list[Request]) -> Request:
        return max(running, key=lambda r: (r.priority, r.arrival_time))


POLICIES: dict[str, type[WaitingQueue]] = {"fcfs": FCFSQueue, "priority": PriorityQueue}


def make_waiting_queue(policy: str) -> WaitingQueue:
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {policy!r}; choose from {sorted(POLICIES)}") from None
