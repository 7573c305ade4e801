"""LLM: the offline API, shaped like vLLM's so users can switch."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from kvserve.engine.llm_engine import LLMEngine, PromptType
from kvserve.outputs import RequestOutput
from kvserve.request import SLO
from kvserve.sampling_params import SamplingParams

# Above this many prompts a progress bar is shown (when use_tqdm is left on).
_TQDM_MIN_PROMPTS = 4


def _per_prompt(value: Any, single: type, n: int, what: str) -> list[Any]:
    """One value for every prompt, or a sequence of exactly one per prompt."""
    if value is None or isinstance(value, single):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"got {len(values)} {what} for {n} prompts")
    return values


class LLM:
    """Offline inference: `LLM(model=DIR).generate(prompts, SamplingParams(...))`.

    Keyword arguments are those of `LLMEngine` (device, dtype, block_size,
    max_num_seqs, max_num_batched_tokens, kv_cache_memory, num_kv_blocks,
    enable_prefix_caching, seed, max_model_len, scheduling_policy, kv_tiers, ...).

    Closing: `with LLM(...) as llm:` or `llm.close()` writes the KV saves still
    queued (and, with a disk or Redis tier, the blocks still in the device
    cache) and stops the tier threads.  An LLM nobody closed is closed when it
    is garbage-collected (`del llm`) or at interpreter exit, with the same
    bounded wait; closing is idempotent.
    """

    def __init__(self, model: Optional[str] = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(model, **kwargs)

    def close(self, timeout: Optional[float] = None) -> bool:
        """Write queued KV saves (and cached device blocks, to disk/Redis tiers) and stop
        the tier threads, waiting at most `timeout` s (default 60); True when every save
        was written.  `generate` raises afterwards."""
        return self.engine.close(timeout)

    @property
    def closed(self) -> bool:
        return self.engine.closed

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        priority: Optional[Sequence[int]] = None,
        tenant: Union[str, Sequence[Optional[str]], None] = None,
        slo: Union[SLO, Sequence[Optional[SLO]], None] = None,
    ) -> list[RequestOutput]:
        """`priority` (one per prompt, lower first, as in vLLM), `tenant` and `slo` (one for all
        prompts or one per prompt) are what the scheduling policy reads (docs/scheduling.md)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        tenants = _per_prompt(tenant, str, len(prompts), "tenants")
        slos = _per_prompt(slo, SLO, len(prompts), "SLOs")
        ids = []
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                ids.append(self.engine.add_request(prompt, sp, priority=priority[i] if priority else 0,  # type: ignore[arg-type]
                                                   tenant=tenants[i], slo=slos[i]))
        except Exception:
            for rid in ids:  # leave nothing queued behind a failed batch
                self.engine.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: Optional[str] = None) -> list[RequestOutput]:
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            ids = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=add_generation_prompt,
                                          chat_template=chat_template)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(ids) >= _TQDM_MIN_PROMPTS:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        scheduler = self.engine.core.scheduler
        scheduler.closed_batch = True  # nothing else is submitted while this batch runs
        try:
            while pending:
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError(f"engine idle with {len(pending)} requests unfinished")
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            scheduler.closed_batch = False
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]
