"""EngineCore: the step loop binding scheduler, KV manager and model runner.

    step():  schedule -> execute -> update_from_output -> outputs

It speaks token ids only; text (detokenization, stop strings) is the output
processor's job.  A failure while executing a step fails the requests in that
step, not the engine.

With KV offload tiers (`kv_tier_config`), the scheduler may park requests in
WAITING_FOR_KV while a background thread loads their prefix; the runner copies
blocks out to (kv_saves) and in from (kv_loads) host memory before each
forward.  Call `close()` to write out queued saves before the process exits.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from kvserve.config import CacheConfig, KVTierConfig, SchedulerConfig
from kvserve.worker.dtypes import parse_dtype
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.scheduler import Scheduler
from kvserve.models.loader import load_model
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams
from kvserve.worker.model_runner import ModelRunner, kv_block_bytes

logger = logging.getLogger(__name__)

DEFAULT_KV_CACHE_MEMORY = 2 * 1024**3  # bytes, when neither size is given
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


class EngineCore:
    def __init__(self, model_dir: str, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
                 cache_config: CacheConfig = CacheConfig(), scheduler_config: Optional[SchedulerConfig] = None,
                 seed: int = 0, attention_backend: str = "auto", eos_token_ids: frozenset[int] = frozenset(),
                 max_model_len: Optional[int] = None, kv_tier_config: Optional[KVTierConfig] = None) -> None:
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        if self.device.type == "cpu":
            from kvserve.utils.cpu_alloc import tune_malloc

            tune_malloc()
        torch.manual_seed(seed)
        from kvserve.models.model_config import parse_model_config

        arch = parse_model_config(model_dir)
        limit = arch.max_position_embeddings
        if arch.sliding_window and arch.sliding_window < limit:
            logger.warning("model uses a sliding window of %d tokens; max_model_len is capped to it",
                           arch.sliding_window)
            limit = arch.sliding_window
        if max_model_len is None:
            max_model_len = scheduler_config.max_model_len if scheduler_config else limit
        self.max_model_len = min(max_model_len, limit)
        self.model, self.arch = load_model(model_dir, self.dtype, self.device, max_positions=self.max_model_len)
        sc = scheduler_config or SchedulerConfig()
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=sc.max_num_seqs, max_num_batched_tokens=sc.max_num_batched_tokens,
            max_model_len=self.max_model_len, policy=sc.policy,
            long_prefill_token_threshold=sc.long_prefill_token_threshold,
        )
        self.cache_config = cache_config
        block_bytes = kv_block_bytes(self.arch, cache_config.block_size, self.dtype)
        if cache_config.num_kv_blocks is not None:
            num_blocks = cache_config.num_kv_blocks
        else:
            budget = cache_config.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
            num_blocks = budget // block_bytes
            # No point in more blocks than max_num_seqs full-length sequences.
            cap = self.scheduler_config.max_num_seqs * -(-self.max_model_len // cache_config.block_size)
            num_blocks = min(num_blocks, cap)
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory={budget} bytes is smaller than one KV block ({block_bytes} bytes)")
        self.kv_manager = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.kv_tiers = None
        if kv_tier_config is not None and kv_tier_config.enabled:
            if not cache_config.enable_prefix_caching:
                raise ValueError("kv_tiers needs enable_prefix_caching=True (tier blocks are found by hash)")
            from kvserve.engine.kv_tiers import KVTiers

            self.kv_tiers = KVTiers(kv_tier_config, model_dir, self.arch, self.dtype, cache_config.block_size)
        self.scheduler = Scheduler(self.scheduler_config, self.kv_manager,
                                   offload=self.kv_tiers.manager if self.kv_tiers else None)
        self.eos_token_ids = eos_token_ids or frozenset(self.arch.eos_token_ids)
        self.runner = ModelRunner(self.model, self.arch, num_blocks, cache_config.block_size, self.dtype,
                                  self.device, self.eos_token_ids, attention_backend, seed)
        if self.kv_tiers is not None:
            self.runner.kv_transfer = self.kv_tiers.attach(self.runner.kv_caches)
        self.stats = EngineStats()
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, cache_config.block_size,
                    num_blocks * block_bytes / 2**20)

    # ------------------------------------------------------------- requests
    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     arrival_time: Optional[float] = None, priority: int = 0,
                     sample_index: int = 0, parent_id: Optional[str] = None) -> Request:
        bad = [t for t in prompt_token_ids if not (0 <= t < self.arch.vocab_size)]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.arch.vocab_size}): {bad[:5]}")
        return Request(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling_params=params,
            eos_token_ids=self.eos_token_ids, arrival_time=arrival_time or time.time(), priority=priority,
            parent_id=parent_id, sample_index=sample_index, num_samples_to_fork=params.n,
            block_size=self.cache_config.block_size,
        )

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort(self, request_id: str) -> Optional[Request]:
        req = self.scheduler.abort(request_id)
        self.flush_kv_saves()
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----------------------------------------------------------------- step
    def step(self) -> list[Request]:
        """Run one step; return the requests that got tokens or finished."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if sched.finished_ids or sched.kv_saves:
                self.runner.execute(sched)  # let the runner drop per-request state, copy saves out
            if self.kv_tiers is not None and self.scheduler.num_waiting_for_kv:
                self.kv_tiers.io.wait_for_load(_IDLE_LOAD_WAIT_S)  # nothing runnable until a load lands
            return []
        try:
            result = self.runner.execute(sched)
        except Exception as exc:  # a failure fails this step's requests, not the engine
            logger.exception("model step failed; failing %d requests", len(sched.requests))
            failed = []
            for sr in sched.requests:
                req = self.scheduler.finish_request(sr.request_id, RequestStatus.FINISHED_ERROR)
                if req is not None:
                    req.stop_reason = f"{type(exc).__name__}: {exc}"
                    failed.append(req)
            return failed
        changed = self.scheduler.update_from_output(sched, result)
        self.flush_kv_saves()  # blocks of requests that finished in this step
        forks, self.scheduler.new_forks = self.scheduler.new_forks, []
        self.stats.num_steps += 1
        self.stats.step_time_s += time.perf_counter() - t0
        for sr in sched.requests:
            self.stats.num_prompt_tokens += max(0, min(len(sr.token_ids), len(sr.prompt_token_ids) - sr.start_pos))
        for req in changed:
            self.stats.num_generation_tokens += 1
            if req.is_finished:
                reason = req.status.finish_reason or "unknown"
                self.stats.finished_by_reason[reason] = self.stats.finished_by_reason.get(reason, 0) + 1
        return changed + forks

    # ------------------------------------------------------------ KV tiers
    def flush_kv_saves(self) -> None:
        """Copy blocks queued for saving (finished requests) out of the pool now,
        while their content is intact; the saver thread writes them."""
        if self.kv_tiers is not None:
            self.kv_tiers.flush_saves()

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

    def close(self) -> None:
        """Write out queued KV saves and stop the tier threads (idempotent)."""
        if self.kv_tiers is not None:
            self.flush_kv_saves()
            self.kv_tiers.close()
