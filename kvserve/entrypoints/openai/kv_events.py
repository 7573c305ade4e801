"""`GET /kv_events`: an instance's prefix-cache changes, for routers to follow (long poll).

The engine process sends its KV events with each step (core/kv_events.py, engine_process.py);
`KVEventLog.append` numbers them (one `seq` per record, from 1) and keeps:
  * the recent records, bounded by `max_hashes` hashes in all, so a subscriber that keeps up
    gets every change exactly once, in order;
  * a mirror of the cache's hash set, so a subscriber that fell behind (or is new, or follows an
    earlier server: `epoch` differs) gets a snapshot: all_cleared, then every cached hash.

    GET /kv_events?epoch=E&after=K&wait=S
    -> {"epoch": E', "seq": L, "block_size": 16, "snapshot": false, "more": false,
        "events": [{"type": "stored", "block_hashes": ["<64 hex>", ...], "parent_block_hash": null},
                   {"type": "removed", "block_hashes": [...]}, {"type": "all_cleared"}]}

The events are the records with seq in (K, L], in the router's event format (router/kv_events.py);
`more` says that more are ready now (at most `max_events` records per answer).  With nothing
after K, the answer waits up to S seconds (default 0, at most 30) for a change.  Without `after`,
with another epoch or with K older than what is kept, the answer is a snapshot ("snapshot": true)
at seq L.  Following (epoch, seq) from answer to answer reproduces the engine's cache exactly.
The route needs the API key like the API routes (hashes tell which prompts are cached).
"""
from __future__ import annotations

import asyncio
import uuid
from collections import deque
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kvserve.entrypoints.openai.errors import OpenAIError

MAX_WAIT_S = 30.0


class KVEventLog:
    """Numbered KV event records plus a mirror of the cached hashes (the API process's view)."""

    def __init__(self, block_size: int, *, max_hashes: int = 1 << 17, max_events: int = 1000) -> None:
        self.block_size = block_size
        self.max_hashes = max_hashes
        self.max_events = max_events
        self.epoch = uuid.uuid4().hex  # a restarted server is another epoch: followers resync
        self.seq = 0  # seq of the last record appended
        self._records: deque[tuple[int, str, list[bytes]]] = deque()  # (seq, kind, hashes), oldest first
        self._num_hashes = 0
        self.cached: set[bytes] = set()
        self._changed: Optional[asyncio.Event] = None

    # -------------------------------------------------------------- producer
    def append(self, records: list[Any]) -> None:
        """Records from the engine (KVEventRecords), in order; called on the event loop."""
        for kind, hashes in records:
            hashes = list(hashes)
            if kind == "stored":
                self.cached.update(hashes)
            elif kind == "removed":
                self.cached.difference_update(hashes)
            elif kind == "all_cleared":
                self.cached.clear()
                hashes = []
            else:
                continue  # not a kind this server knows; the mirror stays exact for the others
            self.seq += 1
            self._records.append((self.seq, kind, hashes))
            self._num_hashes += len(hashes)
        while self._records and self._num_hashes > self.max_hashes:
            _, _, dropped = self._records.popleft()
            self._num_hashes -= len(dropped)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # -------------------------------------------------------------- consumer
    @property
    def first_kept_seq(self) -> int:
        """The oldest seq still kept (seq + 1 when none is)."""
        return self._records[0][0] if self._records else self.seq + 1

    def answer(self, epoch: Optional[str], after: Optional[int]) -> dict[str, Any]:
        """The events after `after` of `epoch`, or a snapshot (see the module doc)."""
        base = {"epoch": self.epoch, "block_size": self.block_size}
        follows = epoch == self.epoch and after is not None and after <= self.seq
        if not follows or after < self.first_kept_seq - 1:  # type: ignore[operator]
            events: list[dict[str, Any]] = [{"type": "all_cleared"}]
            if self.cached:
                events.append(_event("stored", list(self.cached)))
            return {**base, "seq": self.seq, "snapshot": True, "more": False, "events": events}
        assert after is not None
        picked = [r for r in self._records if r[0] > after][: self.max_events]
        last = picked[-1][0] if picked else after
        return {**base, "seq": last, "snapshot": False, "more": last < self.seq,
                "events": [_event(kind, hashes) for _, kind, hashes in picked]}

    async def wait(self, epoch: Optional[str], after: Optional[int], wait_s: float) -> dict[str, Any]:
        """`answer`, after waiting up to `wait_s` for a record after `after` when there is none."""
        if wait_s > 0 and epoch == self.epoch and after is not None and after == self.seq:
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        return self.answer(epoch, after)


def _event(kind: str, hashes: list[bytes]) -> dict[str, Any]:
    if kind == "all_cleared":
        return {"type": "all_cleared"}
    out: dict[str, Any] = {"type": kind, "block_hashes": [h.hex() for h in hashes]}
    if kind == "stored":
        out["parent_block_hash"] = None  # the index needs no parents: hashes chain already
    return out


def add_kv_event_route(app: FastAPI, log: KVEventLog) -> None:
    """Install GET /kv_events on `app`."""

    @app.get("/kv_events", include_in_schema=False)
    async def kv_events(request: Request) -> JSONResponse:
        q = request.query_params
        after = _number(q.get("after"), int, "after", 0.0)
        wait_s = _number(q.get("wait"), float, "wait", 0.0)
        if wait_s is not None and wait_s > MAX_WAIT_S:
            raise OpenAIError(400, f"wait must be at most {MAX_WAIT_S:g} seconds.", param="wait")
        answer = await log.wait(q.get("epoch"), None if after is None else int(after), wait_s or 0.0)
        return JSONResponse(answer)


def _number(text: Optional[str], kind: type, name: str, minimum: float) -> Optional[float]:
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise OpenAIError(400, f"{name} must be a number, got {text[:40]!r}.", param=name) from None
    if not value >= minimum:
        raise OpenAIError(400, f"{name} must be >= {minimum:g}, got {value}.", param=name)
    return float(value)
