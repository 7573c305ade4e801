"""KVTierIO: background loads and saves against a KV store.

Two daemon threads, so neither the engine step nor loads wait on saves:
  loader: fetches a request's blocks (`store.get_many`) into host tensors;
          a miss mid-way truncates the load to the blocks before it.
  saver:  encodes and writes copied-out blocks (`store.put_many`).

Both work in small chunks so a tier's lock (which serializes its I/O) is never
held for long; the scheduler's `lookup` on the engine thread takes the same
locks and so waits at most one chunk.

Implements the executor's `HostBlockIO` (worker/kv_transfer.py: submit_saves,
take_loaded, submit_load, cancel_load, poll), which the model runner drives
from each step's kv_saves / kv_loads / kv_fetches / kv_cancels and whose poll
becomes the step output's kv_transfers_done; and `lookup`, the one read the
scheduler makes (through core/kv_offload.StepTierClient).

Lock discipline: `self._cond` protects every dict/set/counter below; store
calls are made without holding it.

Shutdown: `close()` waits (bounded) for queued saves, then stops and joins
both threads.  An exit hook (weakref.finalize, run at interpreter exit) does
the same for an instance nobody closed.  No thread may still be running at
interpreter finalization: there, a daemon thread that comes back from C++
code (a torch op or zstd that released the GIL) is ended with pthread_exit,
whose forced unwind through torch's noexcept frames calls std::terminate
("terminate called without an active exception", exit 134).  So the threads
also check `_abandon` between chunks: once a close gives up waiting, each
finishes at most the chunk in hand and exits, and the join always returns.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvserve.core.hashing import BlockHash
from kvserve.core.kv_offload import TierEvents

logger = logging.getLogger(__name__)

LOAD_CHUNK_BLOCKS = 8
SAVE_CHUNK_BLOCKS = 4
DEFAULT_CLOSE_TIMEOUT_S = 60.0
# After a close gave up waiting, how long to wait for the threads to finish their chunk.
_JOIN_TIMEOUT_S = 10.0
_STOP = object()


@dataclass(slots=True)
class IOStats:
    loads: int = 0
    blocks_loaded: int = 0
    load_wall_s: float = 0.0        # submit -> result ready, summed over loads (queueing included)
    saves: int = 0                  # blocks handed to the store
    save_wall_s: float = 0.0        # time in store.put_many, summed
    saves_dropped: int = 0          # refused: too many bytes already pending (or after close)
    saves_abandoned: int = 0        # queued, but still unwritten when a close stopped waiting
    errors: int = 0                 # unexpected exceptions from the store (treated as misses)


class KVTierIO:
    def __init__(self, store: Any, max_pending_save_bytes: int = 256 * 1024**2) -> None:
        self.store = store
        self.max_pending_save_bytes = max_pending_save_bytes
        self.stats = IOStats()
        self._cond = threading.Condition()
        # request id -> (submission token, submit time).  A result is delivered only
        # if its token is still the request's: a cancelled load (or one of an
        # earlier request that reused the id) is dropped, never mistaken for another.
        self._inflight: dict[str, tuple[int, float]] = {}
        self._tokens = itertools.count()
        self._done: dict[str, list[torch.Tensor]] = {}    # loaded, not yet polled
        self._ready: dict[str, list[torch.Tensor]] = {}   # polled, not yet taken by the runner
        self._saved: list[BlockHash] = []
        self._dropped: list[BlockHash] = []
        self._pending_save_bytes = 0
        self._saves_queued = 0                            # save batches queued, not finished
        self._loads: queue.Queue[Any] = queue.Queue()
        self._saves: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._abandon = False  # set by close: the threads stop after the chunk in hand
        self._threads = [
            threading.Thread(target=self._load_loop, name="kv-tier-loader", daemon=True),
            threading.Thread(target=self._save_loop, name="kv-tier-saver", daemon=True),
        ]
        for t in self._threads:
            t.start()
        # Closes an instance nobody closed at interpreter exit (see the module doc).  It holds
        # only a weak reference: the threads keep this object alive until it is closed anyway.
        self._exit_hook = weakref.finalize(self, _close_at_exit, weakref.ref(self))

    # ------------------------------------------------------- scheduler side (a read)
    def lookup(self, block_hashes: Sequence[BlockHash]) -> int:
        try:
            return int(self.store.longest_prefix(block_hashes))
        except Exception:
            logger.exception("KV tier lookup failed; treating it as a miss")
            with self._cond:
                self.stats.errors += 1
            return 0

    # ---------------------------------------------------------- executor side
    def submit_load(self, request_id: str, block_hashes: Sequence[BlockHash]) -> None:
        token = next(self._tokens)
        with self._cond:
            self._done.pop(request_id, None)
            self._ready.pop(request_id, None)
            self._inflight[request_id] = (token, time.perf_counter())
        self._loads.put((request_id, token, list(block_hashes)))

    def poll(self) -> TierEvents:
        with self._cond:
            ev = TierEvents({rid: len(blocks) for rid, blocks in self._done.items()}, self._saved, self._dropped)
            self._ready.update(self._done)
            self._done = {}
            self._saved, self._dropped = [], []
        return ev

    def cancel_load(self, request_id: str) -> None:
        with self._cond:
            self._inflight.pop(request_id, None)
            self._done.pop(request_id, None)
            self._ready.pop(request_id, None)

    def wait_for_load(self, timeout: float) -> bool:
        """Block until some load finished (or `timeout`): for an engine with nothing else to run."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._done) or not self._inflight, timeout)

    def take_loaded(self, request_id: str) -> list[torch.Tensor]:
        with self._cond:
            return self._ready.pop(request_id, [])

    def submit_saves(self, items: list[tuple[BlockHash, torch.Tensor]], persist: bool = False) -> None:
        """Queue copied-out blocks for writing; never blocks.  Beyond the pending-bytes
        bound new saves are dropped (reported back through `poll`).  `persist`: write
        them to the persistent tiers only (`store.persist_many`), for the flush on close."""
        if not items:
            return
        nbytes = sum(t.numel() * t.element_size() for _, t in items)
        with self._cond:
            if self._closed or self._pending_save_bytes + nbytes > self.max_pending_save_bytes:
                self.stats.saves_dropped += len(items)
                self._dropped.extend(h for h, _ in items)
                return
            self._pending_save_bytes += nbytes
            self._saves_queued += 1
        self._saves.put((items, nbytes, persist))

    def wait_for_room(self, nbytes: int, timeout: float | None) -> bool:
        """Block until `nbytes` more of saves fit under the pending bound (or `timeout`):
        for a flush that must not have its saves dropped."""
        nbytes = min(nbytes, self.max_pending_save_bytes)
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pending_save_bytes + nbytes <= self.max_pending_save_bytes, timeout)

    @property
    def pending_save_bytes(self) -> int:
        with self._cond:
            return self._pending_save_bytes

    @property
    def closed(self) -> bool:
        return self._closed

    # ---------------------------------------------------------------- control
    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued load and save has finished; True if it did."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._inflight and self._saves_queued == 0, timeout)

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> bool:
        """Finish queued saves (waiting at most `timeout` s), stop and join the threads,
        close the store.  True when every queued save was written.  Idempotent."""
        with self._cond:
            if self._closed:
                return True
            self._closed = True  # from now on submit_saves drops
            pending = self._pending_save_bytes
        t0 = time.perf_counter()
        if pending:
            logger.info("KV tier I/O: writing %.1f MiB of queued saves (waiting up to %.1f s)",
                        pending / 2**20, timeout)
        drained = self.drain(timeout)
        with self._cond:
            self._abandon = True
            self._inflight.clear()  # a load still running is cancelled (its result is dropped)
        self._loads.put(_STOP)
        self._saves.put(_STOP)
        for t in self._threads:
            t.join(_JOIN_TIMEOUT_S)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:  # a store call stuck past its own timeouts; nothing more can be done safely
            logger.error("KV tier I/O: thread(s) %s did not stop within %.0f s", alive, _JOIN_TIMEOUT_S)
        if not drained:
            logger.warning("KV tier I/O: gave up after %.1f s; %d queued blocks were not written",
                           timeout, self.stats.saves_abandoned)
        elif pending:
            logger.info("KV tier I/O: queued saves written in %.2f s", time.perf_counter() - t0)
        try:
            self.store.close()
        except Exception:
            logger.exception("closing the KV store failed")
        self._exit_hook.detach()
        return drained

    # ---------------------------------------------------------------- threads
    def _load_loop(self) -> None:
        while True:
            job = self._loads.get()
            if job is _STOP:
                return
            request_id, token, hashes = job
            blocks = self._fetch(request_id, token, hashes)
            with self._cond:
                entry = self._inflight.get(request_id)
                if entry is not None and entry[0] == token:
                    del self._inflight[request_id]
                    self._done[request_id] = blocks
                    self.stats.loads += 1
                    self.stats.blocks_loaded += len(blocks)
                    self.stats.load_wall_s += time.perf_counter() - entry[1]
                self._cond.notify_all()

    def _current(self, request_id: str, token: int) -> bool:
        with self._cond:
            entry = self._inflight.get(request_id)
            return entry is not None and entry[0] == token

    def _fetch(self, request_id: str, token: int, hashes: list[BlockHash]) -> list[torch.Tensor]:
        """The leading blocks of `hashes` the store returns, stopping at the first miss."""
        out: list[torch.Tensor] = []
        for i in range(0, len(hashes), LOAD_CHUNK_BLOCKS):
            if not self._current(request_id, token):
                return []  # cancelled
            try:
                got = self.store.get_many(hashes[i:i + LOAD_CHUNK_BLOCKS])
            except Exception:
                logger.exception("KV tier load failed; treating it as a miss")
                with self._cond:
                    self.stats.errors += 1
                return out
            for block in got:
                if block is None:
                    return out
                out.append(block)
        return out

    def _save_loop(self) -> None:
        while True:
            job = self._saves.get()
            if job is _STOP:
                return
            items, nbytes, persist = job
            t0 = time.perf_counter()
            done, failed = self._write(items, persist)
            with self._cond:
                self.stats.save_wall_s += time.perf_counter() - t0
                self.stats.saves += done
                self._saved.extend(h for h, _ in items[:done])
                if done < len(items):
                    self._dropped.extend(h for h, _ in items[done:])
                    if failed:
                        self.stats.errors += 1
                    else:
                        self.stats.saves_abandoned += len(items) - done
                self._pending_save_bytes -= nbytes
                self._saves_queued -= 1
                self._cond.notify_all()

    def _write(self, items: list[tuple[BlockHash, torch.Tensor]], persist: bool) -> tuple[int, bool]:
        """Write `items` chunk by chunk: (blocks written, whether a store call failed).
        Stops early (not failed) once a close abandoned the queue."""
        put = self.store.persist_many if persist else self.store.put_many
        done = 0
        while done < len(items):
            if self._abandon:  # read without the lock: a stale False costs one more chunk
                return done, False
            chunk = items[done:done + SAVE_CHUNK_BLOCKS]
            try:
                put(chunk)
            except Exception:
                logger.exception("KV tier save failed; dropping %d blocks", len(items) - done)
                return done, True
            done += len(chunk)
        return done, False


def _close_at_exit(ref: "weakref.ReferenceType[KVTierIO]") -> None:
    """weakref.finalize callback: close an instance still open at interpreter exit."""
    io = ref()
    if io is None or io.closed:
        return
    logger.info("KV tier I/O still open at exit; closing it")
    io.close()
