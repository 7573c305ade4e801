"""Forwarding a request to an instance, with retries on another one.

An attempt fails, and the next candidate is tried, when nothing has reached the client yet and
  * the instance cannot be reached (connect error): it is also removed until a health check
    re-admits it;
  * the connection is lost before the answer (reset, protocol error): a crash, or a keep-alive
    connection the instance closed as it was reused; the health checker decides about removal;
  * it answers 5xx (overloaded, engine dead, draining): the health checker decides about removal.
For a stream, "nothing reached the client" lasts until the instance's first body chunk arrives:
the router holds the response headers back until then.  A 4xx is the client's error and is
passed through as it is.  A read timeout is answered 504 and not retried (the instance is slow,
not gone, and a retry would double the wait).

After the first byte the response is the instance's, passed through byte for byte (raw, still
encoded if it was); if the instance cuts a stream, the router ends it with an OpenAI error event
and `data: [DONE]`, as the server does when it fails mid-stream.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import httpx
from fastapi.responses import Response, StreamingResponse

from kvserve.entrypoints.openai.errors import OpenAIError
from kvserve.router.instances import Instance, InstancePool
from kvserve.router.metrics import RouterMetrics
from kvserve.router.policies import RouteDecision, RoutingPolicy
from kvserve.router.prompts import RouteRequest

logger = logging.getLogger(__name__)

INSTANCE_HEADER = "x-kvserve-instance"  # added to every routed response: which instance answered
# Not forwarded in either direction: per-connection headers, and ones the far side recomputes.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                         "upgrade", "host", "content-length", "date", "server"})


def request_headers(headers: Any) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
    out.setdefault("accept-encoding", "identity")  # don't let httpx ask for compression the client did not
    return out


def response_headers(resp: httpx.Response, inst: Instance) -> dict[str, str]:
    out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
    out[INSTANCE_HEADER] = inst.url
    return out


def sse_error_event(message: str, code: str, status_type: str = "server_error") -> bytes:
    body = {"error": {"message": message, "type": status_type, "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class _AttemptFailed(Exception):
    def __init__(self, reason: str, message: str, *, remove: bool,
                 failure: Optional["Buffered"] = None) -> None:
        super().__init__(message)
        self.reason = reason  # connect | read | status
        self.remove = remove  # the instance looks gone: take it out of rotation now
        self.failure = failure  # the 5xx answer, passed on if no other instance does better


@dataclass(slots=True)
class Buffered:
    """A whole (non-streamed) answer from an instance."""

    inst: Instance
    status: int
    headers: dict[str, str]
    body: bytes

    def response(self) -> Response:
        return Response(self.body, status_code=self.status, headers=self.headers)


@dataclass(slots=True)
class _Streaming:
    inst: Instance
    upstream: httpx.Response
    chunks: AsyncIterator[bytes]
    first: bytes


@dataclass
class Forwarder:
    pool: InstancePool
    policy: RoutingPolicy
    client: httpx.AsyncClient
    metrics: RouterMetrics
    block_size: int
    max_attempts: int = 3
    # called after a successful routing decision's answer (status < 400), for hit-rate metrics
    on_answered: list[Callable[[Instance, RouteDecision, RouteRequest], None]] = field(default_factory=list)

    async def send(self, slot: str, method: str, path: str, body: bytes, headers: dict[str, str],
                   route: RouteRequest, *, buffer: bool = False) -> Response | Buffered:
        """Route and forward; a `Response` to return to the client, or with `buffer=True` the whole
        answer (streams refused) for the caller to inspect.  Raises OpenAIError 503/504."""
        tried: set[str] = set()
        last_failure: Optional[Buffered] = None
        errors: list[str] = []
        for attempt in range(self.max_attempts):
            candidates = [i for i in self.pool.routable(slot) if i.url not in tried]
            if not candidates:
                break
            decision = self.policy.choose(candidates, route)
            inst = decision.instance
            tried.add(inst.url)
            self.policy.on_routed(decision, route)
            self.metrics.attempts.labels(inst.url).inc()
            if attempt:
                self.metrics.retries.labels(inst.url).inc()
            release = _Release(inst, decision.new_blocks(route, self.block_size))
            try:
                outcome = await self._attempt(inst, method, path, body, headers, buffer, release)
            except _AttemptFailed as exc:
                release()
                self.metrics.failed_attempts.labels(inst.url, exc.reason).inc()
                errors.append(f"{inst.url}: {exc}")
                logger.warning("attempt on %s failed (%s): %s", inst.url, exc.reason, exc)
                if exc.remove:
                    self.pool.mark_failed(inst, str(exc))
                last_failure = exc.failure or last_failure
                continue
            except BaseException:
                release()
                raise
            return self._commit(outcome, decision, route, release, buffer)
        if last_failure is not None:
            self.metrics.requests.labels(last_failure.inst.url).inc()
            return last_failure if buffer else last_failure.response()
        raise self.no_instance_error(slot, errors)

    def no_instance_error(self, slot: str, errors: list[str]) -> OpenAIError:
        insts = self.pool.in_slot(slot)
        if errors:
            self.metrics.no_instance.labels("all_failed").inc()
            msg = f"Every instance tried failed: {'; '.join(errors)}."
            code = "all_instances_failed"
        else:
            self.metrics.no_instance.labels("none_healthy").inc()
            states = "; ".join(f"{i.url}: {_state(i)}" for i in insts) or "none configured"
            what = "instance" if slot == "any" else f"{slot} instance"
            msg = (f"No healthy {what} to route to ({sum(i.routable for i in insts)} of {len(insts)} routable: "
                   f"{states}).")
            code = "no_healthy_instance"
        return OpenAIError(503, msg, code=code, type="service_unavailable", headers={"Retry-After": "1"})

    async def _attempt(self, inst: Instance, method: str, path: str, body: bytes, headers: dict[str, str],
                       buffer: bool, release: "_Release") -> Buffered | _Streaming:
        request = self.client.build_request(method, inst.url + path, content=body, headers=headers)
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise _AttemptFailed("connect", f"connect timeout: {exc}", remove=True) from None
            raise self._timeout(inst) from None
        except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:
            raise _AttemptFailed("connect", f"{type(exc).__name__}: {exc}", remove=True) from None
        except httpx.TransportError as exc:
            # Connected, then lost before the answer: a crash, or the instance closing an idle
            # keep-alive connection just as it was reused.  Retry elsewhere; the health check (or
            # the next connect error) decides whether the instance is gone.
            raise _AttemptFailed("read", f"connection lost before the answer: {type(exc).__name__}: {exc}",
                                 remove=False) from None
        try:
            chunks = upstream.aiter_raw()
            streaming = upstream.headers.get("content-type", "").startswith("text/event-stream")
            if upstream.status_code < 500 and streaming and not buffer:
                first = await _first_chunk(chunks)
                release.prefill_done()  # the first token is out: the prompt is computed
                return _Streaming(inst, upstream, chunks, first)
            data = b"".join([c async for c in chunks])
        except httpx.TimeoutException:
            await upstream.aclose()
            raise self._timeout(inst) from None
        except httpx.TransportError as exc:
            await upstream.aclose()
            raise _AttemptFailed("read", f"connection lost before the answer: {type(exc).__name__}: {exc}",
                                 remove=False) from None
        except BaseException:
            await upstream.aclose()
            raise
        await upstream.aclose()
        answer = Buffered(inst, upstream.status_code, response_headers(upstream, inst), data)
        if upstream.status_code >= 500:
            raise _AttemptFailed("status", f"answered {upstream.status_code}: {data[:200]!r}", remove=False,
                                 failure=answer)
        return answer

    def _timeout(self, inst: Instance) -> OpenAIError:
        return OpenAIError(504, f"The instance {inst.url} did not answer in time.", code="upstream_timeout",
                           type="server_error")

    def _commit(self, outcome: Buffered | _Streaming, decision: RouteDecision, route: RouteRequest,
                release: "_Release", buffer: bool) -> Response | Buffered:
        inst = outcome.inst
        self.metrics.requests.labels(inst.url).inc()
        status = outcome.status if isinstance(outcome, Buffered) else outcome.upstream.status_code
        if status < 400:
            for callback in self.on_answered:
                callback(inst, decision, route)
        if isinstance(outcome, Buffered):
            release()
            return outcome if buffer else outcome.response()
        return _PassThrough(outcome, self.metrics, release)


def _state(inst: Instance) -> str:
    if not inst.checked:
        return "not checked yet"
    if not inst.healthy:
        return f"unhealthy ({inst.last_error})"
    if not inst.role_fits:
        return f"reports role {inst.reported_role or 'none'}, slot needs {inst.slot}"
    return "healthy"


async def _first_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    async for chunk in chunks:
        if chunk:
            return chunk
    return b""


class _Release:
    """An attempt's in-flight accounting on its instance, undone exactly once however it ends."""

    def __init__(self, inst: Instance, blocks: int) -> None:
        self.inst = inst
        self.blocks = blocks  # charged to inst.pending_blocks until the prefill is done
        self.done = False
        inst.inflight += 1
        inst.pending_blocks += blocks

    def prefill_done(self) -> None:
        self.inst.pending_blocks -= self.blocks
        self.blocks = 0

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.inst.inflight -= 1
            self.prefill_done()


class _PassThrough(StreamingResponse):
    """The instance's stream, byte for byte; closes the upstream however the client side ends
    (done, client gone, failed write), so the instance aborts a request nobody reads."""

    def __init__(self, s: _Streaming, metrics: RouterMetrics, release: Callable[[], None]) -> None:
        self._s = s
        self._metrics = metrics
        self._release = release
        super().__init__(self._chunks(), status_code=s.upstream.status_code,
                         headers=response_headers(s.upstream, s.inst))

    @property
    def first_chunk(self) -> bytes:
        """The stream's first body chunk (already read, not yet sent)."""
        return self._s.first

    async def discard(self) -> None:
        """Give up this stream before anything is sent (e.g. to retry elsewhere)."""
        await _close(self._s.upstream.aclose())
        self._release()

    async def _chunks(self) -> AsyncIterator[bytes]:
        tail = b""
        try:
            if self._s.first:
                tail = self._s.first[-2:]
                yield self._s.first
            async for chunk in self._s.chunks:
                if chunk:
                    tail = (tail + chunk)[-2:]
                    yield chunk
        except httpx.HTTPError as exc:
            self._metrics.stream_errors.labels(self._s.inst.url).inc()
            logger.warning("instance %s cut a stream: %s: %s", self._s.inst.url, type(exc).__name__, exc)
            yield (b"" if tail == b"\n\n" else b"\n\n") + sse_error_event(
                f"The instance {self._s.inst.url} failed mid-stream ({type(exc).__name__}).",
                "upstream_stream_error") + b"data: [DONE]\n\n"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self._s.upstream.aclose())
            self._release()


async def _close(closing: Awaitable[None]) -> None:
    try:
        await closing
    except Exception:  # noqa: BLE001 - closing a dead connection may raise; nothing to do about it
        logger.debug("error closing an upstream response", exc_info=True)
