"""KVTierIO: background loads and saves against a KV store.

Two daemon threads, so neither the engine step nor loads wait on saves:
  loader: fetches a request's blocks (`store.get_many`) into host tensors;
          a miss mid-way truncates the load to the blocks before it.
  saver:  encodes and writes copied-out blocks (`store.put_many`).

Both work in small chunks so a tier's lock (which serializes its I/O) is never
held for long; the scheduler's `lookup` on the engine thread takes the same
locks and so waits at most one chunk.

Implements the scheduler's `KVTierClient` (lookup, submit_load, poll,
cancel_load) and the runner's `HostBlockIO` (submit_saves, take_loaded).

Lock discipline: `self._cond` protects every dict/set/counter below; store
calls are made without holding it.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvserve.core.hashing import BlockHash
from kvserve.core.kv_offload import TierEvents

logger = logging.getLogger(__name__)

LOAD_CHUNK_BLOCKS = 8
SAVE_CHUNK_BLOCKS = 4
_STOP = object()


@dataclass(slots=True)
class IOStats:
    loads: int = 0
    blocks_loaded: int = 0
    load_wall_s: float = 0.0        # submit -> result ready, summed over loads (queueing included)
    saves: int = 0                  # blocks handed to the store
    save_wall_s: float = 0.0        # time in store.put_many, summed
    saves_dropped: int = 0          # refused: too many bytes already pending
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
        self._threads = [
            threading.Thread(target=self._load_loop, name="kv-tier-loader", daemon=True),
            threading.Thread(target=self._save_loop, name="kv-tier-saver", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------- scheduler side
    def lookup(self, block_hashes: Sequence[BlockHash]) -> int:
        try:
            return int(self.store.longest_prefix(block_hashes))
        except Exception:
            logger.exception("KV tier lookup failed; treating it as a miss")
            with self._cond:
                self.stats.errors += 1
            return 0

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

    # ---------------------------------------------------------- runner side
    def take_loaded(self, request_id: str) -> list[torch.Tensor]:
        with self._cond:
            return self._ready.pop(request_id, [])

    def submit_saves(self, items: list[tuple[BlockHash, torch.Tensor]]) -> None:
        """Queue copied-out blocks for writing; never blocks.  Beyond the pending-bytes
        bound new saves are dropped (reported back through `poll`)."""
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
        self._saves.put((items, nbytes))

    # ---------------------------------------------------------------- control
    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued load and save has finished; True if it did."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._inflight and self._saves_queued == 0, timeout)

    def close(self, timeout: float = 60.0) -> None:
        """Finish queued saves, stop the threads and close the store."""
        if self._closed:
            return
        if not self.drain(timeout):
            logger.warning("KV tier I/O: saves still pending after %.0f s; closing anyway", timeout)
        with self._cond:
            self._closed = True
        self._loads.put(_STOP)
        self._saves.put(_STOP)
        for t in self._threads:
            t.join(timeout)
        try:
            self.store.close()
        except Exception:
            logger.exception("closing the KV store failed")

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
            items, nbytes = job
            t0 = time.perf_counter()
            ok = True
            for i in range(0, len(items), SAVE_CHUNK_BLOCKS):
                try:
                    self.store.put_many(items[i:i + SAVE_CHUNK_BLOCKS])
                except Exception:
                    logger.exception("KV tier save failed; dropping %d blocks", len(items))
                    ok = False
                    break
            with self._cond:
                self.stats.save_wall_s += time.perf_counter() - t0
                if ok:
                    self.stats.saves += len(items)
                    self._saved.extend(h for h, _ in items)
                else:
                    self.stats.errors += 1
                    self._dropped.extend(h for h, _ in items)
                self._pending_save_bytes -= nbytes
                self._saves_queued -= 1
                self._cond.notify_all()
