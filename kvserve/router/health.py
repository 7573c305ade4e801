"""Periodic health checks: GET /health (200 = up), then GET /metrics for load and role.

A check fails on a transport error, a timeout or a non-200 /health.  /metrics is optional: an
OpenAI-compatible server without it stays routable, with load known only from the router's own
in-flight counts.  All instances are checked concurrently, so one slow instance delays nothing
else beyond `timeout_s`.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

import httpx

from kvserve.router.instances import Instance, InstancePool
from kvserve.router.kv_index import KVIndex
from kvserve.router.metrics import RouterMetrics
from kvserve.router.scrape import InstanceStats, parse_metrics

logger = logging.getLogger(__name__)


class HealthChecker:
    def __init__(self, pool: InstancePool, client: httpx.AsyncClient, metrics: RouterMetrics, *,
                 interval_s: float = 2.0, timeout_s: float = 2.0, kv_index: Optional[KVIndex] = None) -> None:
        self.pool = pool
        self.client = client
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.kv_index = kv_index
        self.rounds = 0  # completed rounds (tests wait on it)
        self._task: Optional[asyncio.Task[None]] = None

    async def check_once(self) -> None:
        """One round over every instance."""
        await asyncio.gather(*(self._check(inst) for inst in self.pool))
        if self.kv_index is not None:
            self.kv_index.expire()
        self.rounds += 1

    async def _check(self, inst: Instance) -> None:
        try:
            resp = await self.client.get(inst.url + "/health", timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            self._failed(inst, f"/health: {type(exc).__name__}: {exc}".rstrip(": "))
            return
        if resp.status_code != 200:
            self._failed(inst, f"/health answered {resp.status_code}")
            return
        self.pool.check_succeeded(inst, await self._scrape(inst))

    async def _scrape(self, inst: Instance) -> Optional[InstanceStats]:
        try:
            resp = await self.client.get(inst.url + "/metrics", timeout=self.timeout_s)
            if resp.status_code != 200:
                return None
            return parse_metrics(resp.text)
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("cannot scrape %s/metrics: %s", inst.url, exc)
            return None

    def _failed(self, inst: Instance, reason: str) -> None:
        self.metrics.check_failures.labels(inst.url).inc()
        self.pool.check_failed(inst, reason)

    # ------------------------------------------------------------------ loop
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="router-health")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check_once()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad round
                logger.exception("health check round failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
