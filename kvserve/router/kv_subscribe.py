"""Following each instance's KV events (GET /kv_events, a long poll) into the router's KV index.

kvserve instances publish their prefix cache's stored / evicted block hashes at `/kv_events`
(entrypoints/openai/kv_events.py).  One task per instance follows them: it asks for the events
after the last (epoch, seq) it applied and waits there up to `wait_s` for new ones; a new
follower, a restarted instance or one that fell behind gets a snapshot (all_cleared + every cached
hash) instead.  Each answer is applied through the same `KVEventIngestor` as POSTed batches, so
the index holds what the instance reports, exactly, once the answer is in.

While an instance is unhealthy it is not followed; the health listener clears its entries (it may
restart with an empty cache) and bumps its generation, so an answer that was in flight across the
transition is dropped and following restarts from a snapshot.  A server without `/kv_events`
(404: another OpenAI-compatible server, or `kvserve serve --no-kv-events`) is asked again only
every `unsupported_retry_s`.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import httpx

from kvserve.router.instances import Instance, InstancePool
from kvserve.router.kv_events import KVEventError

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Cursor:
    epoch: Optional[str] = None
    seq: Optional[int] = None
    generation: int = 0  # bumped by every health transition
    supported: Optional[bool] = None  # None until the first answer
    answers: int = 0  # applied answers (tests wait on it)


class KVEventSubscriber:
    def __init__(self, pool: InstancePool, client: httpx.AsyncClient,
                 apply: Callable[[dict[str, Any]], Any], *, wait_s: float = 2.0, retry_s: float = 1.0,
                 unsupported_retry_s: float = 60.0, api_key: Optional[str] = None) -> None:
        """`apply(batch)` ingests one batch in the router's event format (Router.ingest_kv_events)."""
        self.pool = pool
        self.client = client
        self.apply = apply
        self.wait_s = wait_s
        self.retry_s = retry_s
        self.unsupported_retry_s = unsupported_retry_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.cursors = {inst.url: _Cursor() for inst in pool}
        self._tasks: list[asyncio.Task[None]] = []
        pool.listeners.append(self._on_health_change)

    def _on_health_change(self, inst: Instance, healthy: bool) -> None:
        cur = self.cursors.get(inst.url)
        if cur is not None:
            cur.generation += 1
            cur.epoch = cur.seq = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow(inst), name=f"kv-events {inst.url}") for inst in self.pool]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks = []

    async def _follow(self, inst: Instance) -> None:
        while True:
            try:
                pause = await self.poll_once(inst)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the follower must outlive any one bad answer
                logger.exception("following the KV events of %s failed", inst.url)
                pause = self.retry_s
            if pause:
                await asyncio.sleep(pause)

    async def poll_once(self, inst: Instance) -> float:
        """One request and its application; returns how long to pause before the next."""
        cur = self.cursors[inst.url]
        if not inst.healthy:
            return self.retry_s
        params: dict[str, Any] = {"wait": self.wait_s}
        if cur.epoch is not None and cur.seq is not None:
            params.update(epoch=cur.epoch, after=cur.seq)
        generation = cur.generation
        try:
            resp = await self.client.get(inst.url + "/kv_events", params=params, headers=self.headers,
                                         timeout=self.wait_s + 10.0)
        except httpx.HTTPError as exc:
            logger.debug("GET %s/kv_events: %s", inst.url, exc)
            return self.retry_s
        if resp.status_code == 404:
            if cur.supported is not False:
                logger.info("instance %s publishes no KV events (/kv_events: 404); its index entries are "
                            "predicted from routing only", inst.url)
            cur.supported = False
            return self.unsupported_retry_s
        if resp.status_code != 200:
            logger.warning("GET %s/kv_events answered %d: %s", inst.url, resp.status_code, resp.text[:200])
            return self.retry_s
        if generation != cur.generation:
            return 0.0  # the instance changed health meanwhile: start over from a snapshot
        try:
            body = resp.json()
            epoch, seq, events = str(body["epoch"]), int(body["seq"]), body["events"]
            self.apply({"instance": inst.url, "block_size": body.get("block_size"), "events": events})
        except (ValueError, KeyError, TypeError, KVEventError) as exc:
            logger.warning("cannot apply the KV events of %s: %s", inst.url, exc)
            cur.epoch = cur.seq = None
            return self.unsupported_retry_s if isinstance(exc, KVEventError) else self.retry_s
        cur.supported = True
        cur.epoch, cur.seq = epoch, seq
        cur.answers += 1
        return 0.0
