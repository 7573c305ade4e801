"""Routing policies: which of the routable instances gets a request.

One small interface (`RoutingPolicy`) and a registry (`register_policy`, `create_policy`,
`--policy NAME`).  A policy sees the candidates (healthy, role fits, not yet tried for this
request) and a `RouteRequest`; it returns a `RouteDecision`.  `on_routed` is called once per
attempt that the router makes with the decision, before the request is sent.  In-flight counts
are kept by the router on the `Instance` objects, not by policies.

  round-robin  candidates in turn
  least-load   fewest requests (Instance.load(): the router's in-flight count plus other clients'
               requests seen in the last /metrics scrape), then lowest KV usage, then in turn
  kv-aware     Dynamo's KV router cost, in KV blocks, lowest wins:
                   cost = overlap_weight * (prompt blocks the instance must compute)
                          + prompt blocks still to compute of the requests in flight on it
               i.e. prefix overlap minus load: roughly the prefill work the request waits for.
               Ties go to fewer in-flight requests, then fewer indexed blocks (so new prefixes
               spread over the caches, as SGLang's router does), then in turn.  Overlap comes from the global
               `KVIndex`; the chosen instance is recorded in it.  (Dynamo's load term counts
               all active blocks; this counts the blocks still to compute, which the router can
               follow: a request's are released when its first token streams back.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Protocol, Sequence

from kvserve.router.instances import Instance
from kvserve.router.kv_index import KVIndex
from kvserve.router.prompts import RouteRequest, max_matchable_blocks


@dataclass(slots=True)
class RouteDecision:
    instance: Instance
    overlap_blocks: int = 0  # predicted prefix-cache hit, in blocks (kv-aware only)
    cost: Optional[float] = None

    def new_blocks(self, req: RouteRequest, block_size: int) -> int:
        """Prompt blocks the instance is predicted to compute for `req` (its pending load)."""
        return max(0, req.num_blocks(block_size) - self.overlap_blocks)

    def overlap_tokens(self, block_size: int) -> int:
        return self.overlap_blocks * block_size


@dataclass(slots=True)
class PolicyContext:
    """What a policy may be built with."""

    block_size: int = 16
    kv_index: Optional[KVIndex] = None
    overlap_weight: float = 1.0


class RoutingPolicy(Protocol):
    name: ClassVar[str]
    needs_tokens: ClassVar[bool]  # whether the router must tokenize prompts for it

    def choose(self, candidates: Sequence[Instance], req: RouteRequest) -> RouteDecision:
        """Pick one of `candidates` (never empty)."""
        ...

    def on_routed(self, decision: RouteDecision, req: RouteRequest) -> None:
        ...


_REGISTRY: dict[str, Callable[[PolicyContext], RoutingPolicy]] = {}


def register_policy(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"routing policy {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls
    return wrap


def policy_names() -> list[str]:
    return list(_REGISTRY)


def create_policy(name: str, ctx: PolicyContext) -> RoutingPolicy:
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(_REGISTRY)}")
    return factory(ctx)


class _Rotation:
    """A counter that breaks ties fairly: among equal candidates, the next one in turn."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, tied: Sequence[Instance]) -> Instance:
        inst = tied[self._next % len(tied)]
        self._next += 1
        return inst


@register_policy("round-robin")
class RoundRobinPolicy:
    name: ClassVar[str] = "round-robin"
    needs_tokens: ClassVar[bool] = False

    def __init__(self, ctx: PolicyContext) -> None:
        self._rotation = _Rotation()

    def choose(self, candidates: Sequence[Instance], req: RouteRequest) -> RouteDecision:
        return RouteDecision(self._rotation.pick(candidates))

    def on_routed(self, decision: RouteDecision, req: RouteRequest) -> None:
        pass


@register_policy("least-load")
class LeastLoadPolicy:
    name: ClassVar[str] = "least-load"
    needs_tokens: ClassVar[bool] = False

    def __init__(self, ctx: PolicyContext) -> None:
        self._rotation = _Rotation()

    def choose(self, candidates: Sequence[Instance], req: RouteRequest) -> RouteDecision:
        best = min((i.load(), i.kv_usage()) for i in candidates)
        tied = [i for i in candidates if (i.load(), i.kv_usage()) == best]
        return RouteDecision(self._rotation.pick(tied), cost=best[0])

    def on_routed(self, decision: RouteDecision, req: RouteRequest) -> None:
        pass


@register_policy("kv-aware")
class KVAwarePolicy:
    name: ClassVar[str] = "kv-aware"
    needs_tokens: ClassVar[bool] = True

    def __init__(self, ctx: PolicyContext) -> None:
        if ctx.kv_index is None:
            raise ValueError("the kv-aware policy needs a KV index")
        if ctx.overlap_weight < 0:
            raise ValueError(f"overlap_weight must be >= 0, got {ctx.overlap_weight}")
        self.index = ctx.kv_index
        self.block_size = ctx.block_size
        self.overlap_weight = ctx.overlap_weight
        self._rotation = _Rotation()

    def costs(self, candidates: Sequence[Instance], req: RouteRequest) -> dict[str, tuple[float, int]]:
        """url -> (cost, overlap blocks) for each candidate."""
        prompt_blocks = req.num_blocks(self.block_size)
        limit = max_matchable_blocks(req.num_prompt_tokens or 0, self.block_size)
        overlaps = self.index.overlap_blocks(req.block_hashes[:limit], [i.url for i in candidates])
        out = {}
        for inst in candidates:
            overlap = overlaps[inst.url]
            out[inst.url] = (self.overlap_weight * (prompt_blocks - overlap) + inst.pending_blocks, overlap)
        return out

    def choose(self, candidates: Sequence[Instance], req: RouteRequest) -> RouteDecision:
        costs = self.costs(candidates, req)

        def key(i: Instance) -> tuple[float, int, int]:
            # Fewer blocks indexed = more of its cache free: new prefixes spread over the caches.
            return costs[i.url][0], i.inflight, self.index.num_blocks(i.url)

        best = min(key(i) for i in candidates)
        tied = [i for i in candidates if key(i) == best]
        inst = self._rotation.pick(tied)
        cost, overlap = costs[inst.url]
        return RouteDecision(inst, overlap_blocks=overlap, cost=cost)

    def on_routed(self, decision: RouteDecision, req: RouteRequest) -> None:
        self.index.record_routed(decision.instance.url, req.block_hashes)
