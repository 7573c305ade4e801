"""Persistent per-request runner state, updated by diffs, and the step's input arrays.

`BlockTables` keeps every running request's block table in one preallocated
[rows, width] int64 array (one row per request), updated from the step:

    ScheduledRequest.full_table   block_ids is the whole table (a new or resumed request)
    otherwise                     block_ids are the blocks appended since its last step
    finished_ids, preempted_ids   rows released

so nothing is rebuilt from scratch each step.  `build_step_arrays` then turns
the step into flat NumPy arrays with a handful of vectorized operations
(slot mapping and decode tables by fancy indexing of the table rows), and
`build_step_arrays_reference` does the same the obvious way, request by request;
tests/unit/worker/test_input_batch.py holds the two equal.

Invariant: a row's entries beyond its length are 0, so decode tables come out
padded with block 0 exactly as the reference pads them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from kvserve.protocol import ScheduledRequest


class BlockTables:
    def __init__(self, rows: int = 16, width: int = 16) -> None:
        self.table = np.zeros((rows, width), dtype=np.int64)  # [rows, width] block ids, 0-padded
        self.lens = np.zeros(rows, dtype=np.int64)  # [rows] blocks held per row
        self.row_of: dict[str, int] = {}
        self._free = list(range(rows - 1, -1, -1))  # pop() hands out row 0 first

    # ---------------------------------------------------------------- diffs
    def apply(self, requests: Sequence[ScheduledRequest], released: Sequence[str]) -> None:
        """Fold one step's diffs in: release rows first (ids may be reused), then update."""
        for rid in released:
            self.remove(rid)
        for r in requests:
            if r.full_table:
                self.set(r.request_id, r.block_ids)
            elif r.block_ids:
                self.append(r.request_id, r.block_ids)
            elif r.request_id not in self.row_of:
                raise KeyError(f"request {r.request_id}: a block-table diff for a request the runner has no table "
                               f"for (its first step must carry the full table)")

    def set(self, request_id: str, block_ids: Sequence[int]) -> None:
        row = self.row_of.get(request_id)
        if row is None:
            row = self._alloc_row()
            self.row_of[request_id] = row
        else:
            self.table[row, :self.lens[row]] = 0
        self.lens[row] = 0
        self._write(row, block_ids)

    def append(self, request_id: str, block_ids: Sequence[int]) -> None:
        row = self.row_of.get(request_id)
        if row is None:
            raise KeyError(f"request {request_id}: appended blocks for a request the runner has no table for")
        self._write(row, block_ids)

    def remove(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self.table[row, :self.lens[row]] = 0
            self.lens[row] = 0
            self._free.append(row)

    def ids(self, request_id: str) -> list[int]:
        row = self.row_of[request_id]
        return self.table[row, :self.lens[row]].tolist()

    # ------------------------------------------------------------- storage
    def _write(self, row: int, block_ids: Sequence[int]) -> None:
        start = int(self.lens[row])
        end = start + len(block_ids)
        if end > self.table.shape[1]:
            width = max(end, 2 * self.table.shape[1])
            grown = np.zeros((self.table.shape[0], width), dtype=np.int64)
            grown[:, :self.table.shape[1]] = self.table
            self.table = grown
        self.table[row, start:end] = block_ids
        self.lens[row] = end

    def _alloc_row(self) -> int:
        if not self._free:
            rows = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.lens = np.concatenate([self.lens, np.zeros_like(self.lens)])
            self._free = list(range(2 * rows - 1, rows - 1, -1))
        return self._free.pop()


@dataclass
class StepArrays:
    """One step's inputs as flat arrays; token order: decodes first, then prefill chunks."""

    ordered: list[ScheduledRequest]
    lens: np.ndarray  # [R] tokens per request, in `ordered` order
    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T] cache slot of each token: block_id * block_size + offset
    num_decodes: int  # D: the first D requests (and tokens) are single-token queries
    decode_tables: Optional[np.ndarray]  # [D, max_blocks] covering each context, padded with block 0
    decode_seq_lens: Optional[np.ndarray]  # [D] context length including the new token
    prefill_tables: list[np.ndarray]  # per prefill chunk: the blocks covering start_pos + len


def _order(reqs: Sequence[ScheduledRequest]) -> tuple[list[ScheduledRequest], int]:
    decodes = [r for r in reqs if len(r.token_ids) == 1]
    return decodes + [r for r in reqs if len(r.token_ids) > 1], len(decodes)


def contiguous_start(r: ScheduledRequest) -> int:
    """r.start_pos, after checking that r.positions run contiguously from it (the runner
    computes contiguous runs: prefill chunks and decodes; a subset is refused clearly)."""
    p = r.positions
    n = len(r.token_ids)
    if type(p) is range:
        if p.step == 1 and len(p) == n and p.start == r.start_pos:
            return r.start_pos
    else:
        arr = np.asarray(p, dtype=np.int64)
        if arr.shape == (n,) and n > 0 and arr[0] == r.start_pos and (n == 1 or bool((np.diff(arr) == 1).all())):
            return r.start_pos
    raise ValueError(f"request {r.request_id}: the model runner computes contiguous positions from "
                     f"start_pos={r.start_pos} for its {n} tokens, got {list(p)[:8]}")


def build_step_arrays(reqs: Sequence[ScheduledRequest], tables: BlockTables, block_size: int) -> StepArrays:
    """The step's arrays from the persistent tables, vectorized over tokens and requests."""
    bs = block_size
    ordered, D = _order(reqs)
    R = len(ordered)
    lens = np.fromiter((len(r.token_ids) for r in ordered), dtype=np.int64, count=R)
    starts = np.fromiter((contiguous_start(r) for r in ordered), dtype=np.int64, count=R)
    row_of = tables.row_of
    rows = np.fromiter((row_of[r.request_id] for r in ordered), dtype=np.int64, count=R)
    T = int(lens.sum())
    # Every scheduled position must lie in its request's table.
    if not bool((starts + lens <= tables.lens[rows] * bs).all()):
        bad = ordered[int(np.argmin(starts + lens <= tables.lens[rows] * bs))]
        raise ValueError(f"request {bad.request_id}: positions beyond its block table")
    if T == R:  # decodes only (the steady state): one token per request
        input_ids = np.fromiter((r.token_ids[0] for r in ordered), dtype=np.int64, count=T)
        positions = starts
        token_rows = rows
    else:
        input_ids = np.fromiter(itertools.chain.from_iterable(r.token_ids for r in ordered), dtype=np.int64,
                                count=T)
        first_token = np.cumsum(lens) - lens
        positions = np.arange(T, dtype=np.int64) + np.repeat(starts - first_token, lens)
        token_rows = np.repeat(rows, lens)
    slots = tables.table[token_rows, positions // bs] * bs + positions % bs
    decode_tables = decode_seq_lens = None
    if D:
        decode_seq_lens = starts[:D] + 1
        nb = (decode_seq_lens + bs - 1) // bs
        max_blocks = int(nb.max())
        decode_tables = tables.table[rows[:D], :max_blocks]  # a copy (fancy indexing)
        decode_tables[np.arange(max_blocks)[None, :] >= nb[:, None]] = 0
    prefill_tables = []
    for i in range(D, R):
        nb = -(-int(starts[i] + lens[i]) // bs)
        prefill_tables.append(tables.table[rows[i], :nb].copy())
    return StepArrays(ordered, lens, input_ids, positions, slots, D, decode_tables, decode_seq_lens, prefill_tables)


def build_step_arrays_reference(reqs: Sequence[ScheduledRequest], tables: BlockTables,
                                block_size: int) -> StepArrays:
    """The same arrays, request by request from each full block table (the obvious way)."""
    bs = block_size
    ordered, D = _order(reqs)
    lens = np.array([len(r.token_ids) for r in ordered], dtype=np.int64)
    T = int(lens.sum())
    input_ids = np.empty(T, dtype=np.int64)
    positions = np.empty(T, dtype=np.int64)
    slots = np.empty(T, dtype=np.int64)
    full = {r.request_id: tables.ids(r.request_id) for r in ordered}
    off = 0
    for r in ordered:
        n = len(r.token_ids)
        contiguous_start(r)
        input_ids[off:off + n] = r.token_ids
        pos = np.arange(r.start_pos, r.start_pos + n, dtype=np.int64)
        positions[off:off + n] = pos
        table = np.asarray(full[r.request_id], dtype=np.int64)
        slots[off:off + n] = table[pos // bs] * bs + pos % bs
        off += n
    decode_tables = decode_seq_lens = None
    if D:
        decode_seq_lens = np.array([r.start_pos + 1 for r in ordered[:D]], dtype=np.int64)
        max_blocks = int(-(-decode_seq_lens.max() // bs))
        decode_tables = np.zeros((D, max_blocks), dtype=np.int64)
        for i, r in enumerate(ordered[:D]):
            nb = -(-int(decode_seq_lens[i]) // bs)
            decode_tables[i, :nb] = full[r.request_id][:nb]
    prefill_tables = [np.asarray(full[r.request_id][:-(-(r.start_pos + len(r.token_ids)) // bs)], dtype=np.int64)
                      for r in ordered[D:]]
    return StepArrays(ordered, lens, input_ids, positions, slots, D, decode_tables, decode_seq_lens, prefill_tables)
