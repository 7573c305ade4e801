"""RouterConfig: every setting of `kvserve router`, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kvserve.router.instances import normalize_url
from kvserve.router.policies import policy_names

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20


@dataclass(frozen=True, slots=True)
class RouterConfig:
    instances: tuple[str, ...] = ()  # --instance: plain replicas
    prefill: tuple[str, ...] = ()  # --prefill / --decode: a disaggregated pool
    decode: tuple[str, ...] = ()
    policy: str = "round-robin"
    tokenizer: Optional[str] = None  # directory; without it, kv-aware hashes token-id prompts only
    block_size: int = 16  # must equal the instances' --block-size for KV-aware routing to match
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0
    healthy_after: int = 1
    unhealthy_after: int = 2
    max_attempts: int = 3  # per request, over distinct instances
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0  # longest wait for the next byte (a non-streamed answer: the whole completion)
    kv_overlap_weight: float = 1.0
    kv_index_capacity: int = 200_000  # block hashes per instance
    kv_index_ttl_s: float = 300.0  # lifetime of a predicted (routed, not reported) entry
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    kv_events: bool = True  # kv-aware: follow each instance's GET /kv_events (kv_subscribe.py)
    kv_events_wait_s: float = 2.0  # long-poll wait of each /kv_events request
    instance_api_key: Optional[str] = None  # sent to the instances on the router's own requests (/kv_events)

    def __post_init__(self) -> None:
        for name in ("instances", "prefill", "decode"):
            object.__setattr__(self, name, tuple(normalize_url(u) for u in getattr(self, name)))
        if self.instances and (self.prefill or self.decode):
            raise ValueError("give either --instance URLs (replicas) or --prefill and --decode URLs, not both")
        if bool(self.prefill) != bool(self.decode):
            raise ValueError("a prefill/decode split needs at least one --prefill and one --decode URL")
        if not (self.instances or self.prefill):
            raise ValueError("no instances: give --instance URL (repeatable) or --prefill URL and --decode URL")
        urls = self.instances + self.prefill + self.decode
        dupes = sorted({u for u in urls if urls.count(u) > 1})
        if dupes:
            raise ValueError(f"instance URL(s) given more than once: {', '.join(dupes)}")
        if self.policy not in policy_names():
            raise ValueError(f"unknown --policy {self.policy!r}; known: {', '.join(policy_names())}")
        positive = {"block_size": self.block_size, "healthy_after": self.healthy_after,
                    "unhealthy_after": self.unhealthy_after, "max_attempts": self.max_attempts,
                    "kv_index_capacity": self.kv_index_capacity, "max_request_bytes": self.max_request_bytes}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("health_interval_s", "health_timeout_s", "connect_timeout_s", "read_timeout_s",
                     "kv_index_ttl_s", "kv_events_wait_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.kv_overlap_weight < 0:
            raise ValueError(f"kv_overlap_weight must be >= 0, got {self.kv_overlap_weight}")

    @property
    def disaggregated(self) -> bool:
        return bool(self.prefill)
