"""The instances behind the router: health, reported role, scraped load and in-flight counts.

An instance is routable when it is healthy and its reported role fits the slot it was configured
for (`slot`): an `--instance` slot takes an instance reporting no role or "both"; a `--prefill` or
`--decode` slot takes only one reporting exactly that role (scrape.py), so a prefill/decode split
never routes to instances that cannot hand KV over.

Health state: an instance starts unchecked (not routable); the health checker marks it healthy
after `healthy_after` good checks in a row and unhealthy after `unhealthy_after` bad ones; a
transport error on a real request marks it unhealthy at once (`mark_failed`).  Every transition
to unhealthy clears its blocks from the KV index: a restarted instance has an empty cache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional
from urllib.parse import urlsplit

from kvserve.router.scrape import InstanceStats

logger = logging.getLogger(__name__)

SLOTS = ("any", "prefill", "decode")


def normalize_url(text: str) -> str:
    """'http://host:port[/]' -> 'http://host:port'; ValueError for anything else."""
    raw = text.strip()
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"instance URL {text!r} must look like http://HOST:PORT")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError(f"instance URL {text!r} must have no path, query or fragment (the router adds /v1/...)")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"instance URL {text!r} has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(slots=True)
class Instance:
    url: str
    slot: str = "any"  # "any" (--instance), "prefill" or "decode"
    healthy: bool = False
    checked: bool = False  # at least one health check has completed
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_error: Optional[str] = None
    stats: Optional[InstanceStats] = None  # None: never scraped, or /metrics unavailable
    inflight: int = 0  # requests this router has in flight on it
    # Prompt blocks that requests in flight here still have to compute (as the policy predicted:
    # prompt blocks minus predicted cache hits). Charged when a request is sent, released when its
    # first token streams back (its prefill is done) or when it ends. The kv-aware policy's load.
    pending_blocks: int = 0
    inflight_at_scrape: int = 0  # `inflight` when `stats` was scraped

    @property
    def reported_role(self) -> Optional[str]:
        return self.stats.role if self.stats is not None else None

    @property
    def role_fits(self) -> bool:
        role = self.reported_role
        if self.slot == "any":
            return role in (None, "both")
        return role == self.slot

    @property
    def routable(self) -> bool:
        return self.healthy and self.role_fits

    def load(self) -> float:
        """Requests queued or running on the instance, as current as the router can know: its own
        in-flight count now, plus the requests of other clients seen at the last scrape."""
        if self.stats is None:
            return float(self.inflight)
        others = max(0.0, self.stats.queue - self.inflight_at_scrape)
        return self.inflight + others

    def kv_usage(self) -> float:
        return self.stats.kv_usage if self.stats is not None and self.stats.kv_usage is not None else 0.0


@dataclass
class InstancePool:
    """All configured instances, in command-line order; the one place their health changes."""

    instances: list[Instance]
    healthy_after: int = 1
    unhealthy_after: int = 2
    # called as on_change(instance, healthy) on every transition (metrics, KV index)
    listeners: list[Callable[[Instance, bool], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        urls = [i.url for i in self.instances]
        dupes = sorted({u for u in urls if urls.count(u) > 1})
        if dupes:
            raise ValueError(f"instance(s) given more than once: {', '.join(dupes)}")
        if self.healthy_after < 1 or self.unhealthy_after < 1:
            raise ValueError("healthy_after and unhealthy_after must be >= 1")
        self._by_url = {i.url: i for i in self.instances}

    def __iter__(self) -> Iterator[Instance]:
        return iter(self.instances)

    def __len__(self) -> int:
        return len(self.instances)

    def get(self, url: str) -> Optional[Instance]:
        return self._by_url.get(url.rstrip("/"))

    def routable(self, slot: str = "any") -> list[Instance]:
        return [i for i in self.instances if i.slot == slot and i.routable]

    def in_slot(self, slot: str) -> list[Instance]:
        return [i for i in self.instances if i.slot == slot]

    @property
    def disaggregated(self) -> bool:
        return any(i.slot != "any" for i in self.instances)

    # ---------------------------------------------------------------- transitions
    def check_succeeded(self, inst: Instance, stats: Optional[InstanceStats]) -> None:
        inst.checked = True
        inst.consecutive_failures = 0
        inst.consecutive_successes += 1
        if stats is not None:
            inst.stats = stats
            inst.inflight_at_scrape = inst.inflight
        if not inst.healthy and inst.consecutive_successes >= self.healthy_after:
            inst.last_error = None
            self._set(inst, True)
            if not inst.role_fits:
                logger.warning("instance %s is up but reports role %r, which does not fit its %s slot; it gets "
                               "no requests (instances report their role as kvserve:instance_info{role=...})",
                               inst.url, inst.reported_role, inst.slot)

    def check_failed(self, inst: Instance, reason: str) -> None:
        inst.checked = True
        inst.consecutive_successes = 0
        inst.consecutive_failures += 1
        inst.last_error = reason
        if inst.healthy and inst.consecutive_failures >= self.unhealthy_after:
            self._set(inst, False)

    def mark_failed(self, inst: Instance, reason: str) -> None:
        """A request could not reach the instance: remove it now; the health checker re-admits it."""
        inst.consecutive_successes = 0
        inst.consecutive_failures = max(inst.consecutive_failures, self.unhealthy_after)
        inst.last_error = reason
        if inst.healthy:
            self._set(inst, False)

    def _set(self, inst: Instance, healthy: bool) -> None:
        inst.healthy = healthy
        if healthy:
            logger.info("instance %s is healthy (role %s)", inst.url, inst.reported_role or "not reported")
        else:
            logger.warning("instance %s removed: %s", inst.url, inst.last_error)
        for listener in self.listeners:
            listener(inst, healthy)
