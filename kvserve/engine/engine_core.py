"""EngineCore: the step loop binding scheduler, KV manager and model runner.

    step():  schedule -> execute -> update_from_output -> outputs

It speaks token ids only; text (detokenization, stop strings) is the output
processor's job.  A failure while executing a step fails the requests in that
step, not the engine.

The executor is anything with the model runner's interface (kvserve.protocol.Executor):
`EngineCore.from_config` builds the real runner; a simulator passes a cost model.

With KV offload tiers (`config.kv_tiers`), the scheduler may park requests in
WAITING_FOR_KV while the executor's background thread loads their prefix: the
load starts from a step input (kv_fetches), is reported finished in a step
output (kv_transfers_done) and copied in (kv_loads) before a later forward, as
saves are copied out (kv_saves).  Every executed step's output, one with no
requests too, goes to Scheduler.update_from_output.  Call `close()` to write out
queued saves before the process exits.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
from kvserve.blend.chunk_source import ChunkCache
from kvserve.blend.spec import check_blend_request
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.kv_sources import KVSource
from kvserve.core.scheduler import Scheduler
from kvserve.core.swap import SwapManager
from kvserve.models.loader import load_model
from kvserve.models.model_config import ModelArchConfig
from kvserve.protocol import Executor
from kvserve.request import SLO, Request, RequestStatus
from kvserve.sampling_params import SamplingParams
from kvserve.worker.dtypes import parse_dtype
from kvserve.worker.model_runner import ModelRunner, kv_block_bytes

if TYPE_CHECKING:
    from kvserve.disagg.setup import DisaggEngine
    from kvserve.engine.kv_tiers import KVTiers

Clock = Callable[[], float]

logger = logging.getLogger(__name__)

DEFAULT_KV_CACHE_MEMORY = 2 * 1024**3  # bytes, when neither size is given
# On CPU the KV pages of this many full steps are faulted in at start-up (worker/kv_prefault.py).
KV_PREFAULT_STEPS = 4
# With every request waiting for tier loads, a step waits this long for one to finish
# (instead of spinning); steps with work never wait.
_IDLE_LOAD_WAIT_S = 0.02


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    step_time_s: float = 0.0
    finished_by_reason: dict[str, int] = field(default_factory=dict)


def num_kv_blocks(cache: CacheConfig, scheduler: SchedulerConfig, block_bytes: int) -> int:
    """Device KV blocks for this configuration: the explicit count, else the memory budget's worth
    (capped at max_num_seqs full-length sequences: more could never be used)."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    budget = cache.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
    num_blocks = budget // block_bytes
    assert scheduler.max_model_len is not None, "resolved by EngineCore.from_config"
    cap = scheduler.max_num_seqs * -(-scheduler.max_model_len // cache.block_size)
    num_blocks = min(num_blocks, cap)
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory={budget} bytes is smaller than one KV block ({block_bytes} bytes)")
    return num_blocks


class EngineCore:
    """Scheduler + KV manager + any executor with the model runner's interface.

    `EngineCore.from_config` builds the real thing (model, runner, KV tiers); the
    constructor takes a ready executor, so a cost model can stand in for the model
    (see tests/unit/core/test_trace_replay.py).  `config.scheduler.max_model_len`
    must already be the effective limit (from_config resolves it against the model).
    """

    def __init__(self, config: EngineConfig, executor: Executor, *, num_kv_blocks: int, vocab_size: int,
                 eos_token_ids: frozenset[int] = frozenset(), kv_tiers: Optional[KVTiers] = None,
                 kv_sources: Sequence[KVSource] = (), clock: Clock = time.time,
                 swap: Optional[SwapManager] = None) -> None:
        """`kv_sources`: KV sources the scheduler asks after the device prefix cache
        (before the tiers of `kv_tiers`); `swap`: host swap space for preemption by swap
        (the executor must apply the steps' swap copies, e.g. worker.swap_space.SwapExecutor)."""
        self.config = config
        self.executor = executor
        self.clock = clock
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        if config.scheduler.max_model_len is None:
            raise ValueError("config.scheduler.max_model_len must be set (from_config resolves it from the model)")
        self.max_model_len = config.scheduler.max_model_len
        self.scheduler_config = config.scheduler
        self.cache_config = config.cache
        cc = config.cache
        self.kv_manager = KVCacheManager(num_kv_blocks, cc.block_size, cc.enable_prefix_caching)
        self.kv_tiers = kv_tiers
        # CacheBlend: document chunks at any position (kvserve/blend/), asked after the prefix cache.
        self.chunk_cache = ChunkCache(self.kv_manager, cc.blend_recompute_ratio,
                                      namespace=f"{config.model.model}|{config.model.dtype}".encode(),
                                      offload=kv_tiers.manager if kv_tiers is not None else None)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager,
                                   offload=kv_tiers.manager if kv_tiers is not None else None,
                                   sources=[*kv_sources, self.chunk_cache], clock=clock, swap=swap)
        if config.speculative.enabled:  # speculative decoding: the scheduler drafts, the executor verifies
            from kvserve.spec_decode.scheduling import SpecScheduling

            # A draft model gets its own paged KV pool sized from the target's (spec_decode/paged_draft.py).
            self.scheduler.spec = SpecScheduling.build(config.speculative, vocab_size=vocab_size, clock=clock,
                                                       device=config.device.device, dtype=config.model.dtype,
                                                       num_blocks=num_kv_blocks, block_size=cc.block_size,
                                                       attention_backend=config.device.attention_backend,
                                                       max_num_seqs=config.scheduler.max_num_seqs)
        self.stats = EngineStats()
        # Set by from_config (None for an executor built elsewhere).
        self.model: Optional[torch.nn.Module] = None
        # Prefill/decode disaggregation (kvserve/disagg/setup.py); set by from_config.
        self.disagg: Optional[DisaggEngine] = None
        self.arch: Optional[ModelArchConfig] = None

    @property
    def runner(self) -> Executor:
        """The executor (a ModelRunner when built by from_config)."""
        return self.executor

    @classmethod
    def from_config(cls, config: EngineConfig, eos_token_ids: frozenset[int] = frozenset()) -> EngineCore:
        """Load the model, size the KV pool, build the runner and the KV tiers."""
        device = torch.device(config.device.device)
        dtype = parse_dtype(config.model.dtype)
        if device.type == "cpu":
            from kvserve.utils.cpu_alloc import tune_malloc

            tune_malloc()
        torch.manual_seed(config.model.seed)
        from kvserve.models.model_config import parse_model_config

        model_dir = config.model.model
        arch = parse_model_config(Path(model_dir))
        limit = arch.max_position_embeddings
        if arch.sliding_window and arch.sliding_window < limit:
            logger.warning("model uses a sliding window of %d tokens; max_model_len is capped to it",
                           arch.sliding_window)
            limit = arch.sliding_window
        requested = config.scheduler.max_model_len
        max_model_len = limit if requested is None else min(requested, limit)
        config = dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler,
                                                                           max_model_len=max_model_len))
        model, arch = load_model(model_dir, dtype, device, max_positions=max_model_len)
        from kvserve.models import cpu_linear, fused_ops

        if cpu_linear.packing_enabled(device, dtype):  # packed weights: the fast CPU path
            cpu_linear.pack_linears(model)
        fused = fused_ops.extension_for(device, dtype)
        if fused is not None:  # fused layer ops (RMSNorm, rotary, SwiGLU): CPU float32
            fused_ops.enable(model, fused)
        cc = config.cache
        block_bytes = kv_block_bytes(arch, cc.block_size, dtype)
        num_blocks = num_kv_blocks(cc, config.scheduler, block_bytes)
        if requested is None and num_blocks * cc.block_size < max_model_len:
            # The default must be a length one request can really reach (an explicit one is kept).
            logger.warning("max_model_len=%d: what the KV cache holds (%d blocks of %d tokens), below the "
                           "model's own %d; give the KV cache more memory for longer requests",
                           num_blocks * cc.block_size, num_blocks, cc.block_size, max_model_len)
            max_model_len = num_blocks * cc.block_size
            config = dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler,
                                                                               max_model_len=max_model_len))
        kv_tiers = None
        if config.kv_tiers.enabled:
            if not cc.enable_prefix_caching:
                raise ValueError("kv_tiers needs enable_prefix_caching=True (tier blocks are found by hash)")
            from kvserve.engine.kv_tiers import KVTiers

            kv_tiers = KVTiers(config.kv_tiers, model_dir, arch, dtype, cc.block_size)
        eos = eos_token_ids or frozenset(arch.eos_token_ids)
        runner = ModelRunner(model, arch, num_blocks, cc.block_size, dtype, device, eos,
                             config.device.attention_backend, config.model.seed,
                             kv_prefault_tokens=KV_PREFAULT_STEPS * config.scheduler.max_num_batched_tokens)
        from kvserve.worker import cpu_decoder_stack

        cpu_decoder_stack.attach(model, runner.backend)  # CPU float32: every layer in one C++ call per step
        if kv_tiers is not None:
            runner.kv_transfer = kv_tiers.attach(runner.kv_caches)
        from kvserve.engine.swap_setup import build_swap_manager

        swap = build_swap_manager(config.scheduler, model_dir, block_bytes, cc.block_size, device.type,
                                  torch.cuda.get_device_name(device) if device.type == "cuda" else "")
        executor: Executor = runner
        if swap is not None:
            from kvserve.worker.swap_space import SwapExecutor

            executor = SwapExecutor(runner, swap.num_host_blocks)
        core = cls(config, executor, num_kv_blocks=num_blocks, vocab_size=arch.vocab_size, eos_token_ids=eos,
                   kv_tiers=kv_tiers, swap=swap)
        core.model, core.arch = model, arch
        from kvserve.disagg.setup import attach_disagg

        core.disagg = attach_disagg(core, runner, config.disagg)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, cc.block_size,
                    num_blocks * block_bytes / 2**20)
        return core

    # ------------------------------------------------------------- requests
    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     arrival_time: Optional[float] = None, priority: int = 0,
                     sample_index: int = 0, parent_id: Optional[str] = None,
                     tenant: Optional[str] = None, slo: Optional[SLO] = None,
                     segment_lens: Optional[Sequence[int]] = None, blend_ratio: Optional[float] = None,
                     kv_transfer_params: Optional[dict[str, Any]] = None) -> Request:
        """`segment_lens`: the prompt is these segments (kvserve/blend/spec.py), blended at
        `blend_ratio` (default: the engine's blend_recompute_ratio).  `kv_transfer_params`:
        prefill/decode disaggregation (kvserve/disagg/params.py); ValueError if unusable here."""
        bad = [t for t in prompt_token_ids if not (0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        ratio = self.chunk_cache.ratio if blend_ratio is None else blend_ratio
        if segment_lens is not None:
            check_blend_request(segment_lens, len(prompt_token_ids), params.n, ratio, self.max_model_len)
        req = Request(
            segment_lens=tuple(segment_lens) if segment_lens is not None else None, blend_ratio=ratio,
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling_params=params,
            eos_token_ids=self.eos_token_ids, arrival_time=arrival_time or self.clock(), priority=priority,
            parent_id=parent_id, sample_index=sample_index, num_samples_to_fork=params.n,
            block_size=self.cache_config.block_size, tenant=tenant, slo=slo, kv_transfer_params=kv_transfer_params,
        )
        if self.disagg is not None:
            self.disagg.source.prepare(req, self.scheduler._check_stop)  # checks, counts, first token
        elif kv_transfer_params:
            raise ValueError("kv_transfer_params given, but this engine has no KV transfer set up")
        return req

    def add_request(self, request: Request) -> None:
        try:
            self.scheduler.add_request(request)
        except Exception:
            if self.disagg is not None:  # refused: drop what make_request's transfer check kept
                self.disagg.source.discard(request.request_id)
            raise

    def abort(self, request_id: str) -> Optional[Request]:
        req = self.scheduler.abort(request_id)
        self.flush_kv_saves()
        return req

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Finish requests decided outside the core (stop strings matched by the output processor)."""
        for rid in request_ids:
            self.scheduler.finish_request(rid, status)
        self.flush_kv_saves()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----------------------------------------------------------------- step
    def step(self) -> list[Request]:
        """Run one step; return the requests that got tokens or finished (first those a KV
        source ended before they ran, e.g. a failed KV transfer)."""
        ended = self.scheduler.finish_from_sources()
        changed = self._step()
        return ended + changed if ended else changed

    def _step(self) -> list[Request]:
        t0 = time.perf_counter()
        c0 = self.clock()  # the step's duration on the engine's clock feeds the policy's step-time model
        sched = self.scheduler.schedule()
        if sched.is_empty:
            waiting = self.scheduler.num_waiting_for_kv
            if self.kv_tiers is not None and waiting and not sched.kv_fetches:
                # Nothing runnable until a load lands; one that lands now is in this step's output.
                self.kv_tiers.io.wait_for_load(_IDLE_LOAD_WAIT_S)
            if sched.has_bookkeeping or waiting:
                # The executor drops per-request state, copies saves out, starts and drops
                # loads, and reports finished ones: to the scheduler, like every step's output.
                self.scheduler.update_from_output(sched, self.executor.execute(sched))
            if self.disagg is not None and self.disagg.source.num_fetches_in_flight:
                self.disagg.source.wait(_IDLE_LOAD_WAIT_S)  # nor until a KV transfer lands
            return []
        try:
            result = self.executor.execute(sched)
        except Exception as exc:  # a failure fails this step's requests, not the engine
            logger.exception("model step failed; failing %d requests", len(sched.requests))
            failed = []
            for sr in sched.requests:
                req = self.scheduler.finish_request(sr.request_id, RequestStatus.FINISHED_ERROR)
                if req is not None:
                    req.stop_reason = f"{type(exc).__name__}: {exc}"
                    failed.append(req)
            return failed
        # Requests that got tokens or finished, then samples forked from them (n > 1).
        changed = self.scheduler.update_from_output(sched, result)
        self.flush_kv_saves()  # blocks of requests that finished in this step
        self.stats.num_steps += 1
        dt = time.perf_counter() - t0
        self.stats.step_time_s += dt
        self.scheduler.policy.observe_step(sched.num_batched_tokens, self.clock() - c0)
        for sr in sched.requests:
            self.stats.num_prompt_tokens += max(0, min(len(sr.token_ids), len(sr.prompt_token_ids) - sr.start_pos))
        for req in changed:
            self.stats.num_generation_tokens += len(result.sampled.get(req.request_id, ()))
            if req.is_finished:
                reason = req.status.finish_reason or "unknown"
                self.stats.finished_by_reason[reason] = self.stats.finished_by_reason.get(reason, 0) + 1
        return changed

    # ------------------------------------------------------------ KV tiers
    def flush_kv_saves(self) -> None:
        """Copy blocks queued for saving (finished requests) out of the pool now,
        while their content is intact; the saver thread writes them.  Saves take one
        route: a step input (SchedulerOutput.kv_saves) the executor applies, here a
        step with no requests (which also drops the loads of requests that finished)."""
        step = self.scheduler.flush()
        if step.has_bookkeeping:
            self.scheduler.update_from_output(step, self.executor.execute(step))

    def wait_for_kv_saves(self, timeout: float) -> bool:
        """Copy queued saves out of the pool and wait until the tiers hold them
        (e.g. before another engine reads them); False on timeout.  True without tiers."""
        if self.kv_tiers is None:
            return True
        self.flush_kv_saves()
        return self.kv_tiers.io.drain(timeout)

    def reset_prefix_cache(self) -> bool:
        """Forget the device prefix cache (tiers keep their copies), so the next
        lookups go to the tiers; False while any block is in use."""
        return self.kv_manager.pool.reset_prefix_cache()

    def kv_tier_stats(self) -> Optional[dict[str, Any]]:
        """Per-tier hits, bytes and latencies (see KVTiers.stats), or None without tiers."""
        if self.kv_tiers is None:
            return None
        d = self.kv_tiers.stats()
        d["num_waiting_for_kv"] = self.scheduler.num_waiting_for_kv
        return d

    # ------------------------------------------------------------ verbs
    def stats_snapshot(self) -> dict[str, Any]:
        """Scheduler, KV cache and step counters (EngineStatsSnapshot's engine-side fields)."""
        kv = self.kv_manager
        return dict(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                    kv_cache_usage=kv.usage(), num_free_blocks=kv.num_free_blocks,
                    prefix_cache_queries=kv.prefix_queries, prefix_cache_hits=kv.prefix_hits,
                    num_preemptions=self.scheduler.num_preemptions, num_steps=self.stats.num_steps,
                    preemptions_by={f"{cause}/{mode}": n for (cause, mode), n in self.scheduler.preemptions_by.items()},
                    spec_decode=self.scheduler.spec.metrics.as_dict() if self.scheduler.spec is not None else None,
                    disagg=self.disagg.stats() if self.disagg is not None else None,
                    cacheblend=dataclasses.asdict(self.chunk_cache.stats))

    def kv_tier_io_pending(self) -> bool:
        """True while KV tier threads still load or save, or KV exports wait for a decode
        instance (their counters will move: an idle engine process keeps reporting them)."""
        if self.disagg is not None and self.disagg.source.transport.num_exports > 0:
            return True
        return self.kv_tiers is not None and not self.kv_tiers.io.drain(timeout=0)

    def close(self, timeout: Optional[float] = None, flush_device_blocks: bool = True) -> bool:
        """Write out queued KV saves and, with a persistent tier, the blocks still cached in
        the device pool that no tier holds; then stop the tier threads.  Waits at most
        `timeout` s (default: the tier config's close_timeout_s); True when every save was
        written.  Idempotent.  `flush_device_blocks=False` after a step that did not
        complete (an exception escaped it): blocks it registered may hold KV never
        written, so nothing from the pool is copied out, only saves already copied."""
        if self.disagg is not None:
            self.disagg.close()  # exports nobody fetched are dropped
        tiers = self.kv_tiers
        if tiers is None or tiers.io.closed:
            return True
        timeout = tiers.config.close_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if flush_device_blocks:
            self.flush_kv_saves()
            cached = [(h, block.block_id) for h, block in self.kv_manager.pool.cached.items()]
            tiers.persist_cached(cached, timeout)
        else:
            tiers.manager.take_pending_saves()
        return tiers.close(max(0.0, deadline - time.monotonic()))
