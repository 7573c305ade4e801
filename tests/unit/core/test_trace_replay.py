"""EngineCore driven by a cost model instead of the model: 200 requests of the Azure
conversation trace through the real scheduler and KV manager, on a fake clock.

The executor checks every step it is given (budget, seats, token/position/slot
consistency, no slot written twice) and advances the clock by a formula; the
loop checks the KV manager's integrity after every step and, at the end, that
every request finished with exactly the trace's output length.
"""
from __future__ import annotations

import csv
import itertools
import random
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

import pytest

from kvserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from kvserve.engine.engine_core import EngineCore
from kvserve.protocol import ModelRunnerOutput, SampledToken, SchedulerOutput
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams
from tests.helpers.tiny_models import SHARED_DATA

TRACE = SHARED_DATA / "traces" / "azure" / "AzureLLMInferenceTrace_conv.csv"
NUM_REQUESTS = 200
VOCAB = 32000
EOS = 2
BLOCK = 32
BUDGET = 2048
MAX_SEQS = 32
NUM_BLOCKS = 600  # ~19k tokens: below the trace's peak demand, so preemption happens


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def step_seconds(step: SchedulerOutput) -> float:
    """Cost model: a fixed launch cost, per-token compute, per-request attention/KV reads."""
    kv_tokens = sum(r.start_pos + len(r.token_ids) for r in step.requests)
    return 0.02 + 5e-5 * step.num_batched_tokens + 1e-7 * kv_tokens + 1e-4 * len(step.requests)


@dataclass
class CostModelExecutor:
    """The model runner's interface, with a formula for time and a fixed token for output."""

    clock: FakeClock
    core: EngineCore | None = None
    steps: int = 0
    busy_s: float = 0.0
    max_batched: int = 0
    first_seen: list[str] = field(default_factory=list)
    tables: dict[str, list[int]] = field(default_factory=dict)  # block tables rebuilt from the steps' diffs

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        assert self.core is not None
        out = ModelRunnerOutput()
        for rid in step.finished_ids + step.preempted_ids:
            self.tables.pop(rid, None)
        for r in step.requests:
            if r.full_table:
                self.tables[r.request_id] = list(r.block_ids)
            else:
                self.tables[r.request_id] += r.block_ids  # KeyError: a diff before the full table
            assert self.tables[r.request_id] == self.core.kv_manager.block_ids(r.request_id)
        if step.is_empty:
            return out
        sched = self.core.scheduler
        assert step.num_batched_tokens == sum(len(r.token_ids) for r in step.requests) <= BUDGET
        assert len(step.requests) <= MAX_SEQS and sched.num_running <= MAX_SEQS
        assert len({r.request_id for r in step.requests}) == len(step.requests)
        slots: set[int] = set()
        for r in step.requests:
            req = sched.requests[r.request_id]
            n = len(r.token_ids)
            assert n > 0 and r.token_ids == req.all_token_ids[r.start_pos:r.start_pos + n]
            assert r.sample == (r.start_pos + n == req.num_tokens)
            table = self.tables[r.request_id]
            assert len(table) * BLOCK >= r.start_pos + n
            for p in r.positions:
                slot = table[p // BLOCK] * BLOCK + p % BLOCK
                assert slot not in slots, "two tokens of one step write the same KV slot"
                slots.add(slot)
            if r.request_id not in self.first_seen:
                self.first_seen.append(r.request_id)
            if r.sample:
                out.sampled[r.request_id] = [SampledToken(3 + len(req.output_token_ids) % 1000)]
        self.steps += 1
        self.max_batched = max(self.max_batched, step.num_batched_tokens)
        dt = step_seconds(step)
        self.busy_s += dt
        self.clock.now += dt
        return out


def load_trace() -> list[tuple[float, int, int]]:
    """(arrival s after the first request, prompt tokens, output tokens) of the first NUM_REQUESTS rows."""
    rows = []
    with TRACE.open(newline="") as f:
        for row in itertools.islice(csv.DictReader(f), NUM_REQUESTS):
            stamp = datetime.strptime(row["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f")  # 7 fraction digits -> 6
            rows.append((stamp, max(1, int(row["ContextTokens"])), max(1, int(row["GeneratedTokens"]))))
    first = rows[0][0]
    return [((stamp - first).total_seconds(), n_in, n_out) for stamp, n_in, n_out in rows]


def make_core(clock: FakeClock, executor: CostModelExecutor) -> EngineCore:
    config = EngineConfig(
        model=ModelConfig(model="cost-model"),
        cache=CacheConfig(block_size=BLOCK, num_kv_blocks=NUM_BLOCKS),
        scheduler=SchedulerConfig(max_num_seqs=MAX_SEQS, max_num_batched_tokens=BUDGET, max_model_len=8192),
    )
    core = EngineCore(config, executor, num_kv_blocks=NUM_BLOCKS, vocab_size=VOCAB,
                      eos_token_ids=frozenset({EOS}), clock=clock)
    executor.core = core
    return core


@pytest.mark.skipif(not TRACE.is_file(), reason=f"{TRACE} is not present")
def test_azure_conv_trace_replays_through_the_real_core_with_a_cost_model():
    t_cpu = time.process_time()  # CPU seconds: other processes on a shared CI box do not count
    trace = load_trace()
    clock = FakeClock()
    executor = CostModelExecutor(clock)
    core = make_core(clock, executor)
    rng = random.Random(0)
    system_prompt = [rng.randrange(3, VOCAB) for _ in range(48)]  # shared by every request: prefix hits
    pending = deque(enumerate(trace))
    requests: dict[str, Request] = {}
    finished: dict[str, Request] = {}
    while pending or core.has_unfinished():
        while pending and pending[0][1][0] <= clock.now:
            i, (arrival, n_in, n_out) = pending.popleft()
            prompt = (system_prompt + [rng.randrange(3, VOCAB) for _ in range(n_in)])[:max(n_in, 1)]
            req = core.make_request(str(i), prompt, SamplingParams(max_tokens=n_out, ignore_eos=True),
                                    arrival_time=arrival)
            core.add_request(req)
            requests[req.request_id] = req
        if not core.has_unfinished():
            clock.now = pending[0][1][0]  # idle until the next arrival
            continue
        for req in core.step():
            if req.is_finished:
                finished[req.request_id] = req
        core.kv_manager.check_integrity()
        held = sum(len(ids) for ids in core.kv_manager.req_blocks.values())
        assert core.kv_manager.num_free_blocks <= NUM_BLOCKS and held >= NUM_BLOCKS - core.kv_manager.num_free_blocks
    elapsed = time.process_time() - t_cpu

    assert len(finished) == NUM_REQUESTS == len(requests)
    for rid, req in requests.items():
        _, n_in, n_out = trace[int(rid)]
        assert req.status == RequestStatus.FINISHED_LENGTH, rid
        assert req.num_output_tokens == n_out and req.num_prompt_tokens == n_in, rid
    assert core.kv_manager.num_free_blocks == NUM_BLOCKS and not core.kv_manager.req_blocks
    # FCFS admission: a request never starts before one that arrived earlier.
    assert executor.first_seen == sorted(executor.first_seen, key=lambda rid: (trace[int(rid)][0], int(rid)))
    assert executor.max_batched == BUDGET  # the budget was reached, never exceeded (asserted per step)
    assert core.scheduler.num_preemptions > 0  # the pool was small enough to exercise preemption
    assert core.kv_manager.prefix_hits > 0
    assert core.stats.num_steps == executor.steps
    assert elapsed < 5.0, f"replay took {elapsed:.2f} CPU s"
