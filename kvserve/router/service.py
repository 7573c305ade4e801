"""Router: the instance pool, the policy, the KV index, health checks and forwarding, wired together.

Lifecycle (`lifespan`): one httpx client for everything, a first health-check round before the
app takes requests (so a router that starts next to running instances routes at once), then the
periodic checker; on shutdown the checker stops and the client closes.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Optional

import httpx
from fastapi import Request
from fastapi.responses import Response

from kvserve.entrypoints.openai.errors import OpenAIError
from kvserve.entrypoints.openai.serving import unless_disconnected
from kvserve.router.config import RouterConfig
from kvserve.router.health import HealthChecker
from kvserve.router.instances import Instance, InstancePool
from kvserve.router.kv_events import KVEventIngestor
from kvserve.router.kv_index import KVIndex
from kvserve.router.kv_subscribe import KVEventSubscriber
from kvserve.router.metrics import RouterMetrics
from kvserve.router.pd import PDRouter, TransferProtocol
from kvserve.router.policies import PolicyContext, RouteDecision, create_policy
from kvserve.router.prompts import PromptHasher, RouteRequest
from kvserve.router.proxy import Buffered, Forwarder, request_headers

logger = logging.getLogger(__name__)


class Router:
    def __init__(self, config: RouterConfig, tokenizer: Any = None, *,
                 transport: Optional[httpx.AsyncBaseTransport] = None,
                 transfer: Optional[TransferProtocol] = None) -> None:
        self.config = config
        instances = ([Instance(u, "any") for u in config.instances] + [Instance(u, "prefill") for u in config.prefill]
                     + [Instance(u, "decode") for u in config.decode])
        self.pool = InstancePool(instances, healthy_after=config.healthy_after,
                                 unhealthy_after=config.unhealthy_after)
        self.kv_index = KVIndex(config.kv_index_capacity, config.kv_index_ttl_s)
        self.events = KVEventIngestor(self.kv_index, config.block_size, {i.url for i in instances})
        self.metrics = RouterMetrics(instances, self.kv_index)
        self.pool.listeners.append(self._on_health_change)
        ctx = PolicyContext(block_size=config.block_size, kv_index=self.kv_index,
                            overlap_weight=config.kv_overlap_weight)
        # One policy per slot: round-robin turns and tie-breaks are per pool.
        self.policies = {slot: create_policy(config.policy, ctx) for slot in ("any", "prefill", "decode")}
        # Token-id prompts hash without a tokenizer; text and chat need one (the CLI requires it).
        needs_tokens = self.policies["any"].needs_tokens
        self.hasher = PromptHasher(tokenizer, config.block_size) if needs_tokens else None
        self._transport = transport
        self._transfer = transfer
        self.client: Optional[httpx.AsyncClient] = None
        self.health: Optional[HealthChecker] = None
        self.forwarders: dict[str, Forwarder] = {}
        self.pd: Optional[PDRouter] = None
        self.kv_subscriber: Optional[KVEventSubscriber] = None

    # ---------------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        cfg = self.config
        timeout = httpx.Timeout(cfg.read_timeout_s, connect=cfg.connect_timeout_s)
        # Idle connections are dropped before the instances' own keep-alive timeout (uvicorn: 5 s)
        # so that the router rarely reuses one the instance is closing.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=2.0)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, transport=self._transport)
        for slot, policy in self.policies.items():
            fwd = Forwarder(self.pool, policy, self.client, self.metrics, cfg.block_size, cfg.max_attempts)
            if slot != "decode":  # hit rates are where prompts are computed: replicas, prefill instances
                fwd.on_answered.append(self._count_kv_hit)
            self.forwarders[slot] = fwd
        if self.pool.disaggregated:
            self.pd = PDRouter(self.forwarders["prefill"], self.forwarders["decode"], self.metrics, self._transfer)
        self.health = HealthChecker(self.pool, self.client, self.metrics, interval_s=cfg.health_interval_s,
                                    timeout_s=cfg.health_timeout_s, kv_index=self.kv_index)
        await self.health.check_once()
        self.health.start()
        if cfg.kv_events and self.policies["any"].needs_tokens:  # only kv-aware reads the index
            self.kv_subscriber = KVEventSubscriber(self.pool, self.client, self.ingest_kv_events,
                                                   wait_s=cfg.kv_events_wait_s, retry_s=cfg.health_interval_s,
                                                   api_key=cfg.instance_api_key)
            self.kv_subscriber.start()
        try:
            yield
        finally:
            if self.kv_subscriber is not None:
                await self.kv_subscriber.stop()
            await self.health.stop()
            await self.client.aclose()

    def _on_health_change(self, inst: Instance, healthy: bool) -> None:
        self.metrics.set_health(inst, healthy)
        reported = inst.stats.block_size if inst.stats is not None else None
        if healthy and reported is not None and reported != self.config.block_size:
            logger.warning("instance %s reports KV blocks of %d tokens but the router hashes blocks of %d "
                           "(--block-size): KV-aware overlaps with it will not match", inst.url, reported,
                           self.config.block_size)
        if not healthy:
            # It may come back restarted, with an empty cache and a fresh event sequence.
            self.kv_index.clear_instance(inst.url)
            self.events.forget_instance(inst.url)

    def _count_kv_hit(self, inst: Instance, decision: RouteDecision, route: RouteRequest) -> None:
        if self.policies["any"].needs_tokens and route.num_prompt_tokens:
            self.metrics.kv_routed(inst, route.num_prompt_tokens, decision.overlap_tokens(self.config.block_size))

    # ------------------------------------------------------------------ handlers
    async def generate(self, request: Request, path: str) -> Response:
        """/v1/completions and /v1/chat/completions: routed by the policy."""
        body = await self.read_body(request)
        headers = request_headers(request.headers)
        parsed = _json_object(body) if (self.hasher is not None or self.pd is not None) else None
        route = RouteRequest(path)
        if self.hasher is not None and parsed is not None:
            route = await asyncio.to_thread(self.hasher.route_request, path, parsed)
        work: Awaitable[Response | Buffered]
        if self.pd is not None:
            if parsed is None:
                raise OpenAIError(400, "The request body must be a JSON object.")
            work = self.pd.handle(path, parsed, headers, route)
        else:
            work = self.forwarders["any"].send("any", "POST", path, body, headers, route)
        # A client that leaves first cancels the work, which closes the instance's connection
        # so that the instance aborts the request.
        response = await unless_disconnected(request, work)
        if response is None:
            logger.debug("client of %s went away before the answer", request.url.path)
            return Response(status_code=499)
        return _response(response)

    async def passthrough(self, request: Request, path: str) -> Response:
        """Other API routes (/v1/models, /tokenize, ...): any healthy instance, in turn, with retries."""
        body = await self.read_body(request)
        slot = "decode" if self.pd is not None else "any"
        fwd = self.forwarders[slot]
        return _response(await fwd.send(slot, request.method, path, body, request_headers(request.headers),
                                        RouteRequest(path)))

    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def healthy(self) -> bool:
        if self.pd is not None:
            return bool(self.pool.routable("prefill")) and bool(self.pool.routable("decode"))
        return bool(self.pool.routable("any"))

    def instances_status(self) -> list[dict[str, Any]]:
        out = []
        for i in self.pool:
            s = i.stats
            out.append({"url": i.url, "slot": i.slot, "healthy": i.healthy, "routable": i.routable,
                        "checked": i.checked, "reported_role": i.reported_role, "last_error": i.last_error,
                        "inflight": i.inflight, "pending_blocks": i.pending_blocks, "load": i.load(),
                        "kv_usage": i.kv_usage(), "kv_index_blocks": self.kv_index.num_blocks(i.url),
                        "running": s.running if s else None, "waiting": s.waiting if s else None,
                        "block_size": s.block_size if s else None})
        return out

    def ingest_kv_events(self, body: bytes | dict[str, Any]) -> dict[str, Any]:
        result = self.events.ingest(body)
        self.metrics.kv_events.labels("stored").inc(result.stored)
        self.metrics.kv_events.labels("removed").inc(result.removed)
        self.metrics.kv_events.labels("all_cleared").inc(result.cleared)
        if result.gap:
            self.metrics.kv_events.labels("gap").inc()
        return {"stored": result.stored, "removed": result.removed, "cleared": result.cleared, "gap": result.gap}



def _json_object(body: bytes) -> Optional[dict[str, Any]]:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _response(result: Response | Buffered) -> Response:
    return result.response() if isinstance(result, Buffered) else result


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"The request body is larger than the router's limit of {limit} bytes.",
                       code="request_too_large")
