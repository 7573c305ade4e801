"""Exact behaviour of the server's outer layer and tokenizer lanes, with fake ASGI peers (no server)."""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable, Optional

import pytest

from kvserve.entrypoints.openai.errors import OpenAIError
from kvserve.entrypoints.openai.guard import DrainState, RequestGuard
from kvserve.entrypoints.openai.serving import LARGE_BODY_BYTES, TokenizerLanes

Message = dict[str, Any]


async def _read_body_app(scope: Any, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
    """Reads the whole body, answers 200 with it, then waits for the disconnect."""
    body = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request"
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
    assert (await receive())["type"] == "http.disconnect"


def _scope(path: str = "/v1/completions", headers: Optional[list[tuple[bytes, bytes]]] = None) -> Message:
    return {"type": "http", "method": "POST", "path": path, "headers": headers or []}


class _Peer:
    """The server side of one connection: hands out `chunks` (None = stall), records what is sent."""

    def __init__(self, chunks: list[Optional[bytes]]) -> None:
        self.chunks = list(chunks)
        self.sent: list[Message] = []
        self.disconnected = asyncio.Event()

    async def receive(self) -> Message:
        if not self.chunks:
            await self.disconnected.wait()
            return {"type": "http.disconnect"}
        chunk = self.chunks.pop(0)
        if chunk is None:
            await asyncio.Event().wait()  # a client that stopped sending
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.disconnected.set()

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])


def _guard(limit: int = 100, timeout_s: float = 5.0, drain: Optional[DrainState] = None,
           api_key: Optional[str] = None) -> RequestGuard:
    return RequestGuard(_read_body_app, api_key=api_key, max_request_bytes=limit, body_read_timeout_s=timeout_s,
                        drain=drain or DrainState())


def _run(guard: RequestGuard, peer: _Peer, scope: Optional[Message] = None) -> None:
    asyncio.run(asyncio.wait_for(guard(scope or _scope(), peer.receive, peer.send), 10))


def test_body_within_the_limit_passes_and_later_receives_are_not_timed() -> None:
    peer = _Peer([b"x" * 60, b"y" * 40])
    _run(_guard(limit=100, timeout_s=0.05), peer)  # the disconnect wait outlives the read timeout
    assert peer.status == 200 and peer.sent[1]["body"] == b"x" * 60 + b"y" * 40


def test_chunked_body_over_the_limit_raises_413() -> None:
    with pytest.raises(OpenAIError) as info:
        _run(_guard(limit=100), _Peer([b"x" * 60, b"y" * 41]))
    assert info.value.status == 413 and info.value.headers == {"Connection": "close"}


def test_declared_length_over_the_limit_is_answered_after_discarding_the_body() -> None:
    # The body is read and dropped first: closing with unread bytes would reset the connection
    # and could destroy the 413 on its way to the client.
    peer = _Peer([b"x" * 60, b"y" * 41])
    _run(_guard(limit=100), peer, _scope(headers=[(b"content-length", b"101")]))
    assert peer.status == 413 and peer.chunks == []
    assert (b"connection", b"close") in peer.sent[0]["headers"]
    # A client that stops sending gets the answer once the read timeout passes.
    stalled = _Peer([b"x" * 60, None])
    _run(_guard(limit=100, timeout_s=0.05), stalled, _scope(headers=[(b"content-length", b"101")]))
    assert stalled.status == 413


def test_declared_length_over_the_limit_with_expect_100_continue_is_answered_without_reading() -> None:
    peer = _Peer([b"x" * 101])  # with 'Expect: 100-continue' the client waits: reading would ask it to send
    _run(_guard(limit=100), peer, _scope(headers=[(b"content-length", b"101"), (b"expect", b"100-continue")]))
    assert peer.status == 413 and peer.chunks == [b"x" * 101]


def test_stalled_body_times_out_with_408() -> None:
    with pytest.raises(OpenAIError) as info:
        _run(_guard(timeout_s=0.05), _Peer([b"{", None]))
    assert info.value.status == 408 and info.value.code == "request_timeout"


def test_drain_deadline_ends_a_body_read_with_503() -> None:
    drain = DrainState(timeout_s=3)

    async def main() -> None:
        task = asyncio.ensure_future(_guard(drain=drain)(_scope(), _Peer([b"{", None]).receive, _Peer([]).send))
        await asyncio.sleep(0)  # the read is now waiting for the stalled client
        assert drain.in_flight == 1
        drain.expire()
        with pytest.raises(OpenAIError) as info:
            await asyncio.wait_for(task, 5)
        assert info.value.status == 503 and info.value.code == "server_shutting_down"
        assert drain.in_flight == 0

    asyncio.run(main())


def test_api_key_guards_every_path_but_the_probes() -> None:
    for path, status in (("/openapi.json", 401), ("/docs", 401), ("/version", 401), ("/health", 200),
                         ("/metrics", 200)):
        peer = _Peer([b""])
        _run(_guard(api_key="k"), peer, _scope(path))
        assert peer.status == status, path
    peer = _Peer([b""])
    _run(_guard(api_key="k"), peer, _scope("/openapi.json", [(b"authorization", b"Bearer k")]))
    assert peer.status == 200


def test_tokenizer_lanes_run_small_work_beside_a_large_one() -> None:
    lanes = TokenizerLanes(tokenizer={"vocab": 1})
    release = threading.Event()

    async def main() -> None:
        big = asyncio.ensure_future(lanes.run(LARGE_BODY_BYTES, lambda tok: release.wait(30)))
        small = await asyncio.wait_for(lanes.run(10, lambda tok: tok), 10)  # not behind the blocked big one
        assert small == {"vocab": 1} and not big.done()
        release.set()
        assert await big is True
        # Each lane calls its own copy of the tokenizer (HF tokenizers are not safe to share).
        copies = {id(await lanes.run(size, lambda tok: tok)) for size in (0, LARGE_BODY_BYTES)}
        assert len(copies) == 2

    try:
        asyncio.run(main())
    finally:
        release.set()
        lanes.shutdown()
