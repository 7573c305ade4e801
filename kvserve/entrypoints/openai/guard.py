"""The server's outer ASGI layer: API key, request body limits, and the drain deadline.

`RequestGuard` wraps the whole app, so what it checks holds for every route,
FastAPI's own included (/openapi.json, /docs, /redoc):

  * with an API key, every route except /health and /metrics (probes and
    scrapers) needs `Authorization: Bearer <key>`; the key is checked before
    the body is read;
  * a body larger than `max_request_bytes` gets a 413 (decided from its
    Content-Length before the body is used, or as soon as a chunked body
    passes the limit); a request refused from its headers has its body read
    and dropped first (bounded: `_discard_body`), so closing the connection
    does not reset it under the error response;
  * a body must arrive within `body_read_timeout_s` of the request's headers,
    or the request gets a 408 (a client that sends half a body and stalls
    holds no connection for long);
  * once the drain deadline has passed (`DrainState.expire`), a request still
    reading its body gets a 503.

Errors raised while the app reads the body (408, 413, 503) are `OpenAIError`s
raised from `receive()`, so they reach the app's error handlers like any
other.  Each of them carries `Connection: close`: the rest of the body is
never read, so the connection cannot carry another request.
"""
from __future__ import annotations

import asyncio
import hmac
from typing import Any, Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvserve.entrypoints.openai.errors import OpenAIError

OPEN_PATHS = frozenset({"/health", "/metrics"})
_CLOSE = {"Connection": "close"}


class DrainState:
    """Whether the drain deadline has passed; once it has, in-flight requests end with a 503."""

    def __init__(self, timeout_s: Optional[float] = None) -> None:
        self.timeout_s = timeout_s
        self.expired = False
        self.in_flight = 0  # HTTP requests being handled, probes (/health, /metrics) aside
        self._future: Optional[asyncio.Future[None]] = None

    def future(self) -> asyncio.Future[None]:
        """Done once expired (created on first use, on the running loop)."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            if self.expired:
                self._future.set_result(None)
        return self._future

    def expire(self) -> None:
        self.expired = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    def error(self) -> OpenAIError:
        after = f" after {self.timeout_s:g} s" if self.timeout_s is not None else ""
        return OpenAIError(503, f"The server is shutting down: its drain timeout ended this request{after}. "
                                "Retry on another server.", code="server_shutting_down")


def api_key_error(headers: dict[bytes, bytes], expected: bytes) -> Optional[OpenAIError]:
    """None when the request carries `Authorization: Bearer <expected>`, else the 401."""
    header = headers.get(b"authorization")
    if not header:
        return OpenAIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), expected):
        return OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
    return None


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"The request body is larger than this server's limit of {limit} bytes "
                            "(kvserve serve --max-request-bytes).", code="request_too_large", headers=_CLOSE)


class BodyReader:
    """`receive` for one request: counts body bytes, enforces the read deadline and the drain.

    Only messages up to the end of the body are watched; later calls (the app
    waiting for a disconnect while it streams) pass straight through.
    """

    def __init__(self, receive: Receive, limit: int, timeout_s: float, drain: DrainState) -> None:
        self._receive = receive
        self._limit = limit
        self._timeout_s = timeout_s
        self._drain = drain
        self._deadline = asyncio.get_running_loop().time() + timeout_s
        self._received = 0
        self.done = False

    async def __call__(self) -> Message:
        if self.done:
            return await self._receive()
        if self._drain.expired:
            raise self._drain_error()
        remaining = self._deadline - asyncio.get_running_loop().time()
        task = asyncio.ensure_future(self._receive())
        waiters: set[asyncio.Future[Any]] = {task, self._drain.future()}
        try:
            await asyncio.wait(waiters, timeout=max(remaining, 0.0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()  # safe: uvicorn's receive only waits on an event before it takes data
        if not task.done() or task.cancelled():
            if self._drain.expired:
                raise self._drain_error()
            raise OpenAIError(408, f"The request body did not arrive within {self._timeout_s:g} s "
                                   "(kvserve serve --body-read-timeout).", code="request_timeout", headers=_CLOSE)
        message = task.result()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                raise too_large(self._limit)
            self.done = not message.get("more_body", False)
        else:  # http.disconnect: the app sees it and stops (starlette raises ClientDisconnect)
            self.done = True
        return message

    def _drain_error(self) -> OpenAIError:
        err = self._drain.error()
        err.headers = _CLOSE
        return err


_DISCARD_BYTES = 64 << 20  # at most this much of a refused body is read before the error is sent
_DISCARD_SECONDS = 5.0


async def _discard_body(receive: Receive, max_bytes: int, timeout_s: float) -> None:
    """Read and drop the request body until it ends, `max_bytes` were read or `timeout_s` passed."""
    loop = asyncio.get_running_loop()
    deadline, seen = loop.time() + timeout_s, 0
    while seen <= max_bytes:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), timeout=remaining)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


class RequestGuard:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: ASGIApp, *, api_key: Optional[str], max_request_bytes: int,
                 body_read_timeout_s: float, drain: DrainState) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes
        self.body_read_timeout_s = body_read_timeout_s
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        error = None
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            error = api_key_error(headers, self.api_key)
        if error is None:
            error = self._check_length(headers.get(b"content-length"))
        if error is not None:
            # With 'Expect: 100-continue' the client never sends the body; otherwise it may still be
            # sending it, and closing the socket with unread bytes makes the kernel reset the
            # connection, which can destroy the error response in flight.  So the body is read and
            # thrown away first, within bounds (what is left past them is the client's loss).
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await _discard_body(receive, _DISCARD_BYTES, min(self.body_read_timeout_s, _DISCARD_SECONDS))
            await error.response()(scope, receive, send)
            return
        reader = BodyReader(receive, self.max_request_bytes, self.body_read_timeout_s, self.drain)
        counted = scope["path"] not in OPEN_PATHS
        self.drain.in_flight += counted
        try:
            await self.app(scope, reader, send)
        finally:
            self.drain.in_flight -= counted

    def _check_length(self, value: Optional[bytes]) -> Optional[OpenAIError]:
        if value is None:
            return None
        try:
            length = int(value)
        except ValueError:
            return OpenAIError(400, "The Content-Length header is not a number.", headers=_CLOSE)
        return too_large(self.max_request_bytes) if length > self.max_request_bytes else None
