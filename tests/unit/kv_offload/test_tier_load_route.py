"""Tier loads take one route: step inputs and outputs, plain data (issue 14, item 3).

The executor here is the only thing that touches the tiers' data: a dict store it saves
into, background loads it starts from `SchedulerOutput.kv_fetches` / drops for
`kv_cancels`, finishes when the test says so and reports in
`ModelRunnerOutput.kv_transfers_done`, and copies into device blocks for `kv_loads`.
The scheduler's offload manager gets only a StepTierClient whose one call is a read of
the store's index.  A load started, polled or cancelled any other way never reaches
this executor, so the requests below would never be admitted from the tier.
"""
from __future__ import annotations

from kvserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.kv_offload import KVOffloadManager, StepTierClient
from kvserve.core.kv_sources import OffloadTiers
from kvserve.core.scheduler import Scheduler
from kvserve.engine.engine_core import EngineCore
from kvserve.hashing import BlockHash
from kvserve.protocol import KVFetch, KVLoad, KVTransferEvents, ModelRunnerOutput, SampledToken, SchedulerOutput
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams

BS = 4


class StepOnlyExecutor:
    """Sees nothing but steps.  Device blocks hold the tokens written into them; the tier
    store maps a block hash to a saved block's tokens."""

    def __init__(self) -> None:
        self.store: dict[BlockHash, tuple[int, ...]] = {}
        self.device: dict[int, list[int]] = {}
        self.tables: dict[str, list[int]] = {}
        self.loading: dict[str, list[BlockHash]] = {}  # fetched, not finished
        self.loaded: dict[str, list[tuple[int, ...]]] = {}  # finished, not copied in
        self.finish_now: set[str] = set()  # loads the test lets finish at the next step
        self.steps: list[SchedulerOutput] = []
        self.saved: list[BlockHash] = []

    def lookup(self, hashes: list[BlockHash]) -> int:
        """The tiers' index, as the scheduler may read it."""
        n = 0
        while n < len(hashes) and hashes[n] in self.store:
            n += 1
        return n

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(step)
        for rid in step.kv_cancels:
            self.loading.pop(rid, None)
            self.loaded.pop(rid, None)
        for f in step.kv_fetches:
            self.loading[f.request_id] = list(f.block_hashes)
        for rid in step.finished_ids + step.preempted_ids:
            self.tables.pop(rid, None)
        for s in step.kv_saves:
            self.store[s.block_hash] = tuple(self.device[s.block_id])
            self.saved.append(s.block_hash)
        for load in step.kv_loads:
            blocks = self.loaded.pop(load.request_id)[load.first:load.first + len(load.block_ids)]
            assert len(blocks) == len(load.block_ids)
            for bid, content in zip(load.block_ids, blocks):
                self.device[bid] = list(content)
        out = ModelRunnerOutput()
        for r in step.requests:
            table = self.tables.setdefault(r.request_id, [])
            table[:] = r.block_ids if r.full_table else table + r.block_ids
            for pos, tok in zip(r.positions, r.token_ids):
                block = self.device.setdefault(table[pos // BS], [0] * BS)
                block[pos % BS] = tok
            if r.sample:
                out.sampled[r.request_id] = [SampledToken(900 + len(r.output_token_ids))]
        done = KVTransferEvents(saved=self.saved)
        self.saved = []
        for rid in sorted(self.finish_now & set(self.loading)):
            hashes = self.loading.pop(rid)
            self.loaded[rid] = [self.store[h] for h in hashes[:self.lookup(hashes)]]
            done.loads[rid] = len(self.loaded[rid])
        self.finish_now.clear()
        out.kv_transfers_done = done
        return out


def req(rid: str, tokens: list[int], max_tokens: int = 2) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens), block_size=BS, eos_token_ids=frozenset({999}))


def make(ex: StepOnlyExecutor, policy: str = "finish") -> Scheduler:
    kv = KVCacheManager(32, BS, True)
    offload = KVOffloadManager(StepTierClient(lookup=ex.lookup), BS, policy)
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128), kv,
                     offload=offload)


def run(s: Scheduler, ex: StepOnlyExecutor) -> SchedulerOutput:
    """One step, scheduler <-> executor through the step types only."""
    out = s.schedule()
    s.update_from_output(out, ex.execute(out))
    s.kv.check_integrity()
    return out


PROMPT = list(range(100, 114))  # 3 full blocks + 2 tokens


def test_a_tier_load_is_started_finished_and_copied_in_through_the_steps_alone():
    ex = StepOnlyExecutor()
    s = make(ex)
    s.add_request(req("a", PROMPT, max_tokens=1))
    run(s, ex)  # a finishes: its 3 full blocks leave in the next step ("finish" policy)
    run(s, ex)
    assert len(ex.store) == 3 and s.offload.stats.saves_done == 0  # written; not reported yet
    run(s, ex)
    assert s.offload.stats.saves_done == 3  # the step output reported them
    assert s.kv.pool.reset_prefix_cache()  # the device forgets: only the tier has them
    b = req("b", PROMPT + [7, 8])
    s.add_request(b)
    out = run(s, ex)
    assert b.status == RequestStatus.WAITING_FOR_KV
    assert out.kv_fetches == [KVFetch("b", b.block_hashes[:3])] and ex.loading == {"b": b.block_hashes[:3]}
    out = run(s, ex)  # the load is still running: nothing to admit, no fetch sent twice
    assert out.requests == [] and out.kv_fetches == [] and b.status == RequestStatus.WAITING_FOR_KV
    ex.finish_now.add("b")
    out = run(s, ex)  # this step's output reports the load ...
    assert out.requests == [] and ex.loaded.keys() == {"b"}
    out = run(s, ex)  # ... and the next step admits b with the tier's 12 tokens and copies them in
    ids = s.kv.block_ids("b")
    assert out.kv_loads == [KVLoad("b", 0, ids[:3])]
    assert [(r.request_id, r.start_pos, len(r.token_ids)) for r in out.requests] == [("b", 12, 4)]
    assert b.num_cached_tokens == 12 and s.offload.stats.blocks_used == 3
    # The device blocks now hold b's prompt: loaded content for the first 12, computed after.
    held = [t for bid in ids for t in ex.device[bid]][:16]
    assert held == PROMPT + [7, 8]


def test_a_cancelled_load_is_dropped_by_the_executor_in_the_next_step():
    ex = StepOnlyExecutor()
    s = make(ex)
    a = req("a", PROMPT)
    ex.store.update({h: (0,) * BS for h in a.block_hashes[:3]})
    s.add_request(a)
    out = run(s, ex)
    assert out.kv_fetches == [KVFetch("a", a.block_hashes[:3])] and "a" in ex.loading
    s.abort("a")
    assert "a" in ex.loading  # the abort itself calls nothing on the executor's side
    out = s.flush()
    assert out.kv_cancels == ["a"] and out.requests == []
    ex.finish_now.add("a")
    s.update_from_output(out, ex.execute(out))
    assert ex.loading == {} and ex.loaded == {}  # dropped before it could finish
    assert not s.has_unfinished() and s.offload.num_loads_in_flight == 0


def test_step_client_sends_cancels_before_fetches_and_never_an_unsent_fetch():
    c = StepTierClient(lookup=lambda hashes: 0)
    h = [bytes([i]) * 32 for i in range(3)]
    c.submit_load("x", h[:1])
    c.cancel_load("x")  # never sent: not sent at all; the cancel still goes
    c.cancel_load("y")
    c.submit_load("y", h[1:])  # cancelled then started again: the executor applies the cancel first
    assert c.take_cancels() == ["x", "y"] and c.take_fetches() == [KVFetch("y", h[1:])]
    assert c.take_cancels() == [] and c.take_fetches() == []
    c.deliver(KVTransferEvents(loads={"y": 2}, saved=[h[0]]))
    c.deliver(KVTransferEvents(dropped=[h[1]]))
    assert c.poll() == KVTransferEvents(loads={"y": 2}, saved=[h[0]], dropped=[h[1]])
    assert c.poll() == KVTransferEvents()


def test_engine_core_serves_a_tier_hit_with_an_executor_that_only_sees_steps():
    ex = StepOnlyExecutor()
    config = EngineConfig(model=ModelConfig(model="fake"), cache=CacheConfig(block_size=BS, num_kv_blocks=32),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128))
    core = EngineCore(config, ex, num_kv_blocks=32, vocab_size=1000, clock=lambda: 1.0)
    manager = KVOffloadManager(StepTierClient(lookup=ex.lookup), BS, "finish")
    core.scheduler.sources.append(OffloadTiers(manager, core.kv_manager))
    core.add_request(core.make_request("a", PROMPT, SamplingParams(max_tokens=1)))
    while core.has_unfinished():
        core.step()
    assert len(ex.store) == 3  # a's blocks left in the flush right after it finished
    assert core.reset_prefix_cache()
    b = core.make_request("b", PROMPT + [7, 8], SamplingParams(max_tokens=2))
    core.add_request(b)
    for _ in range(20):
        if not core.has_unfinished():
            break
        if ex.loading:
            ex.finish_now.add("b")
        core.step()  # steps with nothing to run still reach the executor and report back
    assert b.is_finished and b.output_token_ids == [900, 901]
    assert b.num_cached_tokens == 12 and manager.stats.blocks_used == 3
    assert [f for st in ex.steps for f in st.kv_fetches] == [KVFetch("b", b.block_hashes[:3])]
    assert sum(len(st.kv_loads) for st in ex.steps) == 1


class RecordingIO:
    """The executor's host block I/O, recording the order of the calls it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def submit_saves(self, items):
        raise AssertionError("no saves in this test")

    def take_loaded(self, request_id):
        raise AssertionError("no loads copied in this test")

    def submit_load(self, request_id, block_hashes):
        self.calls.append(("load", request_id))

    def cancel_load(self, request_id):
        self.calls.append(("cancel", request_id))

    def poll(self):
        return KVTransferEvents(loads={"x": 1})


def test_the_runners_transfer_drops_cancelled_loads_before_starting_fetches():
    from kvserve.worker.kv_transfer import KVTransfer

    io = RecordingIO()
    t = KVTransfer([], io)
    t.start(["x", "y"], [KVFetch("x", [b"h" * 32])])
    assert io.calls == [("cancel", "x"), ("cancel", "y"), ("load", "x")]
    assert t.finished() == KVTransferEvents(loads={"x": 1})
