"""Persistent block tables updated by diffs, and the vectorized step arrays held equal to
the request-by-request reference."""
from __future__ import annotations

import random

import numpy as np
import pytest

from kvserve.protocol import ScheduledRequest
from kvserve.sampling_params import SamplingParams
from kvserve.worker.input_batch import BlockTables, build_step_arrays, build_step_arrays_reference

BS = 4


def sr(rid: str, start: int, n: int, block_ids: list[int], full: bool) -> ScheduledRequest:
    return ScheduledRequest(rid, list(range(100 + start, 100 + start + n)), range(start, start + n), start,
                            block_ids, start + n > 0, SamplingParams(), [], [], (rid, 0), False, full_table=full)


def assert_same(a, b) -> None:
    assert [r.request_id for r in a.ordered] == [r.request_id for r in b.ordered]
    for name in ("lens", "input_ids", "positions", "slots", "decode_tables", "decode_seq_lens"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype == np.int64 and np.array_equal(x, y), name
    assert a.num_decodes == b.num_decodes
    assert len(a.prefill_tables) == len(b.prefill_tables)
    for x, y in zip(a.prefill_tables, b.prefill_tables):
        assert np.array_equal(x, y)


def test_random_steps_match_the_reference_and_the_true_tables():
    rng = random.Random(0)
    tables = BlockTables(rows=2, width=2)  # small: rows and width must grow
    truth: dict[str, list[int]] = {}  # what the scheduler's KV manager would hold
    computed: dict[str, int] = {}
    next_block = iter(range(10_000))
    for step_no in range(200):
        # Some requests finish, some arrive; each runs a chunk or a decode.
        released = [rid for rid in list(truth) if rng.random() < 0.1]
        for rid in released:
            del truth[rid], computed[rid]
        for _ in range(rng.randrange(3)):
            rid = f"r{step_no}-{rng.randrange(1000)}"
            truth.setdefault(rid, [])
            computed.setdefault(rid, 0)
        step = []
        for rid in truth:
            new_req = not truth[rid]
            n = rng.randrange(1, 40) if new_req or rng.random() < 0.2 else 1
            need = -(-(computed[rid] + n) // BS)
            added = [next(next_block) for _ in range(need - len(truth[rid]))]
            truth[rid] += added
            step.append(sr(rid, computed[rid], n, truth[rid] if new_req else added, new_req))
            computed[rid] += n
        rng.shuffle(step)
        tables.apply(step, released)
        for rid in truth:
            if truth[rid]:
                assert tables.ids(rid) == truth[rid]
        if step:
            assert_same(build_step_arrays(step, tables, BS), build_step_arrays_reference(step, tables, BS))
    # Released rows are zeroed (the padding invariant) and reused.
    for rid in list(truth):
        tables.remove(rid)
    assert not tables.row_of and not tables.table.any() and not tables.lens.any()


def test_decode_tables_are_padded_with_block_zero_even_when_a_row_holds_more_blocks():
    tables = BlockTables()
    # A request holding 3 blocks whose decode needs 2 (e.g. after a rollback of rejected positions).
    tables.apply([sr("a", 0, 5, [7, 8, 9], True), sr("b", 0, 12, [4, 5, 6], True)], [])
    step = [sr("a", 5, 1, [], False), sr("b", 11, 1, [], False)]
    a = build_step_arrays(step, tables, BS)
    assert a.decode_tables.tolist() == [[7, 8, 0], [4, 5, 6]]
    assert_same(a, build_step_arrays_reference(step, tables, BS))


def test_diffs_without_a_table_and_positions_outside_it_are_refused():
    tables = BlockTables()
    with pytest.raises(KeyError, match="no table"):
        tables.apply([sr("x", 4, 1, [], False)], [])
    with pytest.raises(KeyError, match="no table"):
        tables.apply([sr("x", 4, 1, [3], False)], [])
    tables.apply([sr("y", 0, 4, [2], True)], [])
    with pytest.raises(ValueError, match="beyond its block table"):
        build_step_arrays([sr("y", 4, 1, [], False)], tables, BS)
