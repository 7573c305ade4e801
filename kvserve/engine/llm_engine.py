"""LLMEngine: EngineCore plus tokenizer and output processing (text in, text out)."""
from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from kvserve.config import CacheConfig, KVTierConfig, SchedulerConfig
from kvserve.engine.engine_core import EngineCore
from kvserve.engine.output_processor import OutputProcessor
from kvserve.engine.tokenizer import generation_eos_ids, load_tokenizer
from kvserve.models.model_config import parse_model_config
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = Union[str, dict[str, Any]]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"


def resolve_model_dir(model: Optional[str]) -> str:
    if model:
        if not Path(model).is_dir():
            raise FileNotFoundError(f"{model}: model directory does not exist")
        return str(model)
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return str(DEFAULT_MODEL_DIR)
    raise ValueError("no model given and the built-in demo model is not installed; pass a model directory")


class LLMEngine:
    def __init__(self, model: Optional[str] = None, *, tokenizer: Optional[str] = None, device: str = "cpu",
                 dtype: str = "float32", block_size: int = 16, max_num_seqs: int = 128,
                 max_num_batched_tokens: int = 2048, kv_cache_memory: Optional[int] = None,
                 num_kv_blocks: Optional[int] = None, enable_prefix_caching: bool = True, seed: int = 0,
                 max_model_len: Optional[int] = None, scheduling_policy: str = "fcfs",
                 attention_backend: str = "auto", long_prefill_token_threshold: int = 0,
                 kv_tiers: Optional[str] = None, kv_codec: str = "raw", kv_offload_policy: str = "evict",
                 kv_tier_write_policy: str = "write_through") -> None:
        """`kv_tiers` (e.g. "cpu:4GiB,disk:/var/cache/kvserve:20GiB", "redis://127.0.0.1:6379/0")
        adds KV offload tiers below the device pool; `kv_codec` is their default codec
        (raw|int8|fp8|cachegen), `kv_offload_policy` when blocks are written ("evict":
        when the device pool evicts them, "finish": when their request finishes).
        See docs/kv_tiers.md.  Call `close()` so queued saves reach the tiers."""
        tier_config = KVTierConfig(tiers=kv_tiers, codec=kv_codec, offload_policy=kv_offload_policy,
                                   write_policy=kv_tier_write_policy)
        self.model_dir = resolve_model_dir(model)
        try:
            self.tokenizer = load_tokenizer(tokenizer or self.model_dir)
        except FileNotFoundError:
            if tokenizer:
                raise
            logger.warning("%s has no tokenizer: only token-id prompts work and no text is produced", self.model_dir)
            self.tokenizer = None
        arch = parse_model_config(Path(self.model_dir))
        eos = generation_eos_ids(self.model_dir, arch.eos_token_ids, self.tokenizer)
        self.core = EngineCore(
            self.model_dir, device=device, dtype=dtype,
            cache_config=CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory,
                                     num_kv_blocks=num_kv_blocks, enable_prefix_caching=enable_prefix_caching),
            scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                             policy=scheduling_policy,
                                             long_prefill_token_threshold=long_prefill_token_threshold),
            seed=seed, attention_backend=attention_backend, eos_token_ids=eos, max_model_len=max_model_len,
            kv_tier_config=tier_config,
        )
        self.output_processor = OutputProcessor(self.tokenizer, self._finish_from_output)
        self._ids = itertools.count()

    def _finish_from_output(self, request_id: str, status) -> None:
        self.core.scheduler.finish_request(request_id, status)

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
                    arrival_time: Optional[float] = None, priority: int = 0) -> str:
        """Validate and queue one request; raises ValueError for a request that can never run."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.output_processor.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        arrival_time = arrival_time or time.time()
        internal_id = request_id if params.n == 1 else f"{request_id}#0"
        req = self.core.make_request(internal_id, ids, params, arrival_time, priority,
                                     parent_id=None if params.n == 1 else request_id)
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
        outputs = self.output_processor.process(self.core.step())
        self.core.flush_kv_saves()  # requests finished by stop strings just now
        return outputs

    def kv_tier_stats(self) -> Optional[dict[str, Any]]:
        """KV offload tier metrics for /metrics: per tier ("0:cpu", "1:disk", ...) hits, misses,
        bytes read/written, get/put latency sums, used/capacity bytes; plus the engine's
        load/save counters.  None when no tiers are configured."""
        return self.core.kv_tier_stats()

    def close(self) -> None:
        """Write queued KV saves to the tiers and stop their threads (idempotent)."""
        self.core.close()
