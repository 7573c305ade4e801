"""KV sources behind one interface: a new source (a fake remote peer, as prefill/decode
disaggregation will add) plugs in without touching the scheduler; the tier source's
cost estimate; saves and forks leave the engine core by one route each."""
from __future__ import annotations

from typing import Optional

from kvserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.kv_offload import KVOffloadManager
from kvserve.core.kv_sources import KVPlan, KVSource, OffloadTiers
from kvserve.core.scheduler import Scheduler
from kvserve.engine.engine_core import EngineCore
from kvserve.protocol import KVLoad, KVSave, ModelRunnerOutput, SampledToken, SchedulerOutput
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams
from tests.unit.kv_offload.fakes import FakeTierClient

BS = 4


class PeerSource(KVSource):
    """Blocks another engine computed (by hash), fetched over a 'network' the test controls."""

    name = "peer"

    def __init__(self, held: set[bytes]) -> None:
        self.held = held
        self.fetching: dict[str, list[bytes]] = {}
        self.arrived: dict[str, list[bytes]] = {}
        self.done: list[str] = []
        self.calls: list[tuple[str, int, bool]] = []

    def plan(self, request: Request, num_supplied: int, repeat: bool) -> Optional[KVPlan]:
        self.calls.append((request.request_id, num_supplied, repeat))
        rid = request.request_id
        first = num_supplied // BS
        if rid in self.arrived:
            hashes = self.arrived[rid]
            return KVPlan(self, len(hashes) * BS, fill_hashes=hashes)
        last = (request.num_tokens - 1) // BS  # never the block holding the last token
        hashes = []
        for h in request.block_hashes[first:last]:
            if h not in self.held:
                break
            hashes.append(h)
        if not hashes:
            return None
        return KVPlan(self, len(hashes) * BS, cost_s=0.5, ready=False, state=hashes)

    def fetch(self, request: Request, plan: KVPlan) -> None:
        self.fetching[request.request_id] = plan.state

    def finish(self, rid: str) -> None:
        self.arrived[rid] = self.fetching.pop(rid)
        self.done.append(rid)

    def poll(self) -> list[str]:
        done, self.done = self.done, []
        return done

    def placed(self, request: Request, plan: KVPlan, block_ids: list[int]) -> list[KVLoad]:
        self.arrived.pop(request.request_id)
        return [KVLoad(request.request_id, 0, block_ids)]


def req(rid: str, n: int, start: int = 0, max_tokens: int = 2, arrival: float = 0.0) -> Request:
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens), arrival_time=arrival,
                   block_size=BS, eos_token_ids=frozenset({999}))


def step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    s.kv.check_integrity()
    s.update_from_output(out, ModelRunnerOutput(sampled={r.request_id: [SampledToken(7)] for r in out.requests
                                                         if r.sample}))
    s.kv.check_integrity()
    return out


def test_a_new_source_supplies_blocks_after_the_device_hit_without_scheduler_changes():
    kv = KVCacheManager(16, BS)
    first = req("first", 6, max_tokens=1)  # leaves block 0 of the family cached on the device
    probe = req("r", 18)  # blocks 0..3 full; 0 on the device, 1..2 at the peer
    peer = PeerSource(held=set(probe.block_hashes[1:3]))
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), kv, sources=[peer])
    s.add_request(first)
    step(s)
    s.add_request(probe)
    s.add_request(req("b", 5, start=100, arrival=1.0))
    out = step(s)
    # r waits for the peer while b runs; the peer was asked right after the device's 4 tokens.
    assert [r.request_id for r in out.requests] == ["b"]
    assert probe.status == RequestStatus.WAITING_FOR_KV and s.num_waiting_for_kv == 1
    assert [c for c in peer.calls if c[0] == "r"] == [("r", 4, False)] and peer.fetching == {"r": probe.block_hashes[1:3]}
    queries = kv.prefix_queries
    out = step(s)  # not arrived yet
    assert [r.request_id for r in out.requests] == ["b"]
    peer.finish("r")
    out = step(s)
    # Admitted with device 4 + peer 8 tokens: only the last 6 are computed.
    sr = next(r for r in out.requests if r.request_id == "r")
    assert (sr.start_pos, len(sr.token_ids)) == (12, 6)
    ids = kv.block_ids("r")
    assert out.kv_loads == [KVLoad("r", 0, ids[1:3])]
    assert [c for c in peer.calls if c[0] == "r"][-1] == ("r", 4, True)  # the repeated lookup says so
    assert kv.prefix_queries == queries  # ... and the device cache did not count it twice
    for h, bid in zip(probe.block_hashes[1:3], ids[1:3]):
        assert kv.pool.cached[h].block_id == bid  # filled blocks join the prefix cache
    assert probe.num_cached_tokens == 12


def test_tier_source_cost_is_estimated_from_timed_fetches():
    now = [0.0]
    client = FakeTierClient()
    kv = KVCacheManager(16, BS)
    tiers = OffloadTiers(KVOffloadManager(client, BS), kv, clock=lambda: now[0])
    r = req("r", 21)  # 5 full blocks
    client.stored.update(r.block_hashes)
    plan = tiers.plan(r, 0, False)
    assert plan is not None and not plan.ready and plan.num_tokens == 5 * BS
    assert plan.cost_s == 5 * 1e-3  # the prior, before any fetch was timed
    tiers.fetch(r, plan)
    now[0] = 0.5  # 0.1 s per block
    client.finish_load("r")
    assert tiers.poll() == ["r"]
    assert abs(tiers.seconds_per_block - (1e-3 + 0.2 * (0.1 - 1e-3))) < 1e-12
    r2 = req("r2", 21, start=100)
    client.stored.update(r2.block_hashes)
    assert tiers.plan(r2, 0, False).cost_s == 5 * tiers.seconds_per_block


class SaveOnFinish(KVSource):
    """Queues a finished request's cached blocks for saving (what the 'finish' offload policy does)."""

    name = "save-on-finish"

    def __init__(self) -> None:
        self.pending: list[KVSave] = []

    def plan(self, request: Request, num_supplied: int, repeat: bool) -> Optional[KVPlan]:
        return None

    def on_finished(self, request: Request, kv: KVCacheManager) -> None:
        self.pending += [KVSave(h, b) for h, b in kv.cached_blocks(request)]

    def take_saves(self) -> list[KVSave]:
        saves, self.pending = self.pending, []
        return saves


class RecordingExecutor:
    def __init__(self) -> None:
        self.steps: list[SchedulerOutput] = []

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(step)
        return ModelRunnerOutput(sampled={r.request_id: [SampledToken(5)] for r in step.requests if r.sample})


def make_core(executor: RecordingExecutor, sources=()) -> EngineCore:
    config = EngineConfig(model=ModelConfig(model="fake"), cache=CacheConfig(block_size=BS, num_kv_blocks=32),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64))
    return EngineCore(config, executor, num_kv_blocks=32, vocab_size=1000, kv_sources=sources, clock=lambda: 1.0)


def test_saves_of_finished_requests_leave_in_a_request_less_step_right_away():
    ex = RecordingExecutor()
    saver = SaveOnFinish()
    core = make_core(ex, [saver])
    core.add_request(core.make_request("a", list(range(9)), SamplingParams(max_tokens=1)))
    (a,) = core.step()
    assert a.is_finished
    # The forward step, then the flush: a request-less step with a's two full blocks.
    assert len(ex.steps) == 2 and ex.steps[0].kv_saves == [] and ex.steps[1].is_empty
    assert [s.block_hash for s in ex.steps[1].kv_saves] == a.block_hashes[:2]
    b = core.make_request("b", list(range(50, 55)), SamplingParams(max_tokens=3))
    core.add_request(b)
    core.step()
    assert len(ex.steps) == 3 and ex.steps[2].kv_saves == []  # nothing finished: no flush, nothing sent twice
    core.abort("b")  # an abort flushes too: b's one full block
    assert len(ex.steps) == 4 and ex.steps[3].is_empty
    assert [s.block_hash for s in ex.steps[3].kv_saves] == b.block_hashes[:1]


def test_forked_samples_come_back_from_the_step_that_forked_them():
    ex = RecordingExecutor()
    core = make_core(ex)
    core.add_request(core.make_request("g#0", list(range(10)), SamplingParams(n=3, max_tokens=2), parent_id="g"))
    changed = core.step()
    assert [r.request_id for r in changed] == ["g#0", "g#1", "g#2"]
    assert core.stats.num_generation_tokens == 1  # forks got no token yet
    changed = core.step()
    assert sorted(r.request_id for r in changed) == ["g#0", "g#1", "g#2"]
    assert core.scheduler.new_forks == []
