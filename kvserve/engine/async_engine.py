"""AsyncEngine: the API process's handle on an engine running in its own process.

    API process (asyncio)                              engine process (engine_process.py)
      add_requests() / abort() -> outbox -> sender thread --pipe--> EngineLoop: add/abort, step()
      per-request RequestStream <- event loop <- reader thread <--pipe-- StepOutputs (deltas, stats)

The HTTP event loop never waits on the engine: sends go through a queue and a
sender thread (a full pipe cannot block the loop), receives are unpickled on a
reader thread that hands each step's batch to the loop in one callback, which
fans deltas out to per-request asyncio queues.  Many streams therefore make
progress together, one engine step at a time.

The child is started with the "spawn" method (a clean interpreter: no forked
torch threads or CUDA state).  Its death is seen as EOF on the output pipe:
every in-flight stream then fails with `EngineDeadError` and `is_healthy()`
turns False.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Protocol

from kvserve.engine.engine_ipc import (
    AbortRequests, AddRequest, EngineInfo, EngineStatsSnapshot, Ready, RequestDelta, Shutdown, StartupFailed,
    StepOutputs, dumps, loads,
)
from kvserve.engine.engine_process import EngineProcessConfig, run_engine_process

logger = logging.getLogger(__name__)

_STOP_SENDER = object()  # outbox sentinel: the sender thread exits after sending what precedes it
_STARTUP_POLL_S = 0.05


@contextlib.contextmanager
def _environ_defaults(defaults: dict[str, str]) -> Iterator[None]:
    """Set the variables of `defaults` that are unset, for the duration of the block."""
    added = [k for k in defaults if k not in os.environ]
    for k in added:
        os.environ[k] = defaults[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class EngineDeadError(RuntimeError):
    """The engine process is gone; no request can make progress."""


class EngineStartupError(RuntimeError):
    """The engine process could not load the model (the message says why)."""


class EngineObserver(Protocol):
    """Receives per-request timing events (on the event loop thread); metrics implement it."""

    def on_first_token(self, ttft_s: float, num_prompt_tokens: int) -> None: ...

    def on_tokens(self, num_tokens: int, inter_token_s: Optional[float]) -> None: ...

    def on_finished(self, reason: str, e2e_s: float, num_prompt_tokens: int, num_generation_tokens: int) -> None: ...

    def on_engine_stats(self, stats: EngineStatsSnapshot) -> None: ...


class RequestStream:
    """Deltas for the engine requests of one API call (several for batch prompts), in arrival order."""

    def __init__(self, request_ids: list[str]) -> None:
        self.request_ids = list(request_ids)
        self._unfinished = set(request_ids)
        self._queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()

    @property
    def finished(self) -> bool:
        return not self._unfinished

    @property
    def unfinished_ids(self) -> list[str]:
        return [rid for rid in self.request_ids if rid in self._unfinished]

    def put(self, item: RequestDelta | BaseException) -> None:
        self._queue.put_nowait(item)

    async def next_batch(self) -> list[RequestDelta]:
        """Wait for at least one delta, then return every delta that has arrived.

        Taking all that is queued lets a slow consumer catch up in one write
        instead of falling further behind.  Raises EngineDeadError if the
        engine died.
        """
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        batch = []
        for item in items:
            if isinstance(item, BaseException):
                self._unfinished.clear()
                raise item
            batch.append(item)
            if item.finished:
                self._unfinished.discard(item.request_id)
        return batch

    async def __aiter__(self) -> AsyncIterator[list[RequestDelta]]:
        while not self.finished:
            yield await self.next_batch()


@dataclass
class _Tracked:
    """API-side bookkeeping for one in-flight engine request (timings use time.monotonic)."""

    stream: RequestStream
    arrival: float
    num_prompt_tokens: int
    first_token: Optional[float] = None
    last_token: dict[int, float] = field(default_factory=dict)  # sample index -> time of its last token
    num_generation_tokens: int = 0
    first_finish_reason: Optional[str] = None  # of the lowest-index finished sample


class AsyncEngine:
    def __init__(self, config: EngineProcessConfig, observer: Optional[EngineObserver] = None,
                 kv_event_sink: Optional[Callable[[list[Any]], None]] = None) -> None:
        """`kv_event_sink` gets each message's KV events (with `config.kv_events`), on the loop."""
        self.config = config
        self.observer = observer
        self.kv_event_sink = kv_event_sink
        self.info: Optional[EngineInfo] = None
        self.stats = EngineStatsSnapshot()
        self.dead_reason: Optional[str] = None
        self._requests: dict[str, _Tracked] = {}
        self._num_queued = 0  # in-flight requests that have not produced a token yet
        self._proc: Optional[Any] = None
        self._in_conn: Optional[Connection] = None  # we write commands here
        self._out_conn: Optional[Connection] = None  # we read outputs here
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closing = False

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> EngineInfo:
        """Spawn the engine process and wait until the model is loaded."""
        self._loop = asyncio.get_running_loop()
        ctx = mp.get_context("spawn")
        in_r, in_w = ctx.Pipe(duplex=False)
        out_r, out_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=run_engine_process, args=(self.config, in_r, out_w),
                                 name="kvserve-engine", daemon=True)
        with _environ_defaults(self.config.env_defaults):  # the spawned interpreter inherits os.environ
            self._proc.start()
        # Keep only our ends: the child's death must close the last writer of out_r (EOF).
        in_r.close()
        out_w.close()
        self._in_conn, self._out_conn = in_w, out_r
        try:
            msg = await self._wait_startup_message()
        except BaseException:
            self._kill()
            raise
        if isinstance(msg, StartupFailed):
            self._kill()
            raise EngineStartupError(msg.error)
        assert isinstance(msg, Ready), msg
        self.info = msg.info
        for target, name in ((self._read_loop, "kvserve-engine-reader"), (self._send_loop, "kvserve-engine-sender")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return msg.info

    async def _wait_startup_message(self) -> Any:
        assert self._out_conn is not None and self._proc is not None
        # Polling keeps this cancellable (Ctrl-C while a large model loads).
        while not self._out_conn.poll(0):
            if not self._proc.is_alive():
                if self._out_conn.poll(0):
                    break
                raise EngineStartupError(f"engine process exited during startup (exit code {self._proc.exitcode})")
            await asyncio.sleep(_STARTUP_POLL_S)
        try:
            return loads(self._out_conn.recv_bytes())
        except EOFError:
            raise EngineStartupError("engine process exited during startup") from None

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine process (in-flight requests fail with EngineDeadError)."""
        if self._proc is None:
            return
        self._closing = True
        self._outbox.put(Shutdown())
        self._outbox.put(_STOP_SENDER)
        deadline = time.monotonic() + timeout_s
        while self._proc.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._kill()
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()  # not terminate(): the engine ignores SIGTERM (see engine_process.py)
            proc.join(5)
        self._outbox.put(_STOP_SENDER)
        # The child is gone, so the reader sees EOF and the sender its sentinel;
        # close each pipe only after its thread let go of it.
        for t in self._threads:
            t.join(2)
        for conn in (self._in_conn, self._out_conn):
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def is_healthy(self) -> bool:
        return (self.dead_reason is None and not self._closing and self._proc is not None
                and self._proc.is_alive())

    # ------------------------------------------------------------- requests
    @property
    def num_queued(self) -> int:
        """In-flight requests still waiting for their first token."""
        return self._num_queued

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    def add_requests(self, requests: list[AddRequest]) -> RequestStream:
        """Queue requests for the engine; their deltas arrive on the returned stream."""
        if not self.is_healthy():
            raise EngineDeadError(self.dead_reason or "the engine is not running")
        stream = RequestStream([r.request_id for r in requests])
        now = time.monotonic()
        for r in requests:
            if r.request_id in self._requests:
                raise ValueError(f"request id {r.request_id!r} is already in flight")
        for r in requests:
            self._requests[r.request_id] = _Tracked(stream, now, len(r.prompt_token_ids))
            self._num_queued += 1
            self._outbox.put(r)
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests (no-op for finished or unknown ids); their KV blocks are freed."""
        now = time.monotonic()
        live = []
        for rid in request_ids:
            tracked = self._requests.pop(rid, None)
            if tracked is None:
                continue
            live.append(rid)
            if tracked.first_token is None:
                self._num_queued -= 1
            if self.observer is not None:
                self.observer.on_finished("abort", now - tracked.arrival, tracked.num_prompt_tokens,
                                          tracked.num_generation_tokens)
        if live and self.dead_reason is None:
            self._outbox.put(AbortRequests(live))

    def fail_in_flight(self, exc: BaseException) -> int:
        """Abort every in-flight request in the engine and raise `exc` from their streams
        (the drain deadline at shutdown).  Returns the number of streams failed."""
        num_streams = len({id(t.stream) for t in self._requests.values()})
        request_ids = list(self._requests)
        self._fail_all(exc)
        if request_ids and self.dead_reason is None:
            self._outbox.put(AbortRequests(request_ids))
        return num_streams

    # ------------------------------------------------- event loop callbacks
    def _on_message(self, msg: Any) -> None:
        if not isinstance(msg, StepOutputs):
            logger.error("unexpected message from the engine: %r", type(msg).__name__)
            return
        now = time.monotonic()
        self.stats = msg.stats
        if self.observer is not None:
            self.observer.on_engine_stats(msg.stats)
        if msg.kv_events and self.kv_event_sink is not None:
            self.kv_event_sink(msg.kv_events)
        for delta in msg.deltas:
            tracked = self._requests.get(delta.request_id)
            if tracked is None:
                continue  # aborted by us; the engine had not seen the abort yet
            self._account(tracked, delta, now)
            if delta.finished:
                del self._requests[delta.request_id]
            tracked.stream.put(delta)

    def _account(self, tracked: _Tracked, delta: RequestDelta, now: float) -> None:
        obs = self.observer
        for s in delta.samples:
            if s.token_ids:
                if tracked.first_token is None:
                    tracked.first_token = now
                    self._num_queued -= 1
                    if obs is not None:
                        obs.on_first_token(now - tracked.arrival, tracked.num_prompt_tokens)
                last = tracked.last_token.get(s.index)
                tracked.last_token[s.index] = now
                tracked.num_generation_tokens += len(s.token_ids)
                if obs is not None:
                    obs.on_tokens(len(s.token_ids), None if last is None else now - last)
            if s.finish_reason is not None and tracked.first_finish_reason is None:
                tracked.first_finish_reason = s.finish_reason
        if delta.finished:
            if tracked.first_token is None:
                self._num_queued -= 1
            if obs is not None and not delta.rejected:
                reason = "error" if delta.error else (tracked.first_finish_reason or "abort")
                obs.on_finished(reason, now - tracked.arrival, tracked.num_prompt_tokens,
                                tracked.num_generation_tokens)

    def _on_engine_gone(self) -> None:
        if self._closing:
            return
        code = None
        if self._proc is not None:
            self._proc.join(0.5)  # EOF can arrive before the child is reaped; once, at death
            code = self._proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        self.dead_reason = f"the engine process died ({how})"
        logger.error("%s; failing %d in-flight requests", self.dead_reason, len(self._requests))
        self._fail_all(EngineDeadError(self.dead_reason))

    def _fail_all(self, exc: BaseException) -> None:
        streams = {id(t.stream): t.stream for t in self._requests.values()}
        self._requests.clear()
        self._num_queued = 0
        for stream in streams.values():
            stream.put(exc)

    # -------------------------------------------------------------- threads
    def _read_loop(self) -> None:
        assert self._out_conn is not None and self._loop is not None
        while True:
            try:
                msg = loads(self._out_conn.recv_bytes())
            except (EOFError, OSError):
                break
            try:
                self._loop.call_soon_threadsafe(self._on_message, msg)
            except RuntimeError:  # the event loop is closed: we are exiting
                return
        try:
            self._loop.call_soon_threadsafe(self._on_engine_gone)
        except RuntimeError:
            pass

    def _send_loop(self) -> None:
        assert self._in_conn is not None
        while True:
            batch = [self._outbox.get()]
            while True:  # coalesce whatever else is queued into one write
                try:
                    batch.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP_SENDER for item in batch)
            commands = [item for item in batch if item is not _STOP_SENDER]
            if commands:
                try:
                    self._in_conn.send_bytes(dumps(commands))
                except (BrokenPipeError, EOFError, OSError):
                    return  # the reader sees the engine's death and reports it
            if stop:
                return
