"""ModelRunner: execute(SchedulerOutput) -> ModelRunnerOutput.

Owns the model weights, the per-layer KV pools, the sampler and persistent
per-request state (block tables, RNGs) updated by each step's diffs; makes no
policy decisions.  Step inputs are built with vectorized NumPy on the host
(kvserve/worker/input_batch.py) and moved to the device once per step; the
attention metadata is built once and shared by every layer.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from kvserve.models.model_config import ModelArchConfig
from kvserve.utils.cpu_alloc import zero_pages
from kvserve.protocol import (
    AttentionMetadata, ForwardContext, ModelRunnerOutput, PrefillSeq, SampledToken, ScheduledRequest, SchedulerOutput,
)
from kvserve.worker.attention import get_attention_backend, resolve_backend_name
from kvserve.worker.input_batch import BlockTables, build_step_arrays, build_step_arrays_reference
from kvserve.worker.kv_prefault import prefault_kv_blocks
from kvserve.worker.kv_transfer import KVTransfer
from kvserve.worker.sampler import Sampler, SamplingRow, top_logprobs


def kv_block_bytes(cfg: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


# Steps with at least this many requests build their inputs vectorized (measured crossover).
_VECTORIZE_FROM_REQUESTS = 3


def _zero_kv_layer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One layer's KV pool, all zeros; on CPU backed by untouched pages (see zero_pages)."""
    if device.type == "cpu":
        return zero_pages(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: ModelArchConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, eos_token_ids: frozenset[int],
                 attention_backend: str = "auto", seed: int = 0, kv_prefault_tokens: int = 0) -> None:
        """`kv_prefault_tokens`: on CPU, fault in the first blocks of the KV pool, that many
        tokens' worth, now (worker/kv_prefault.py); the others fault in on first write."""
        self.model = model
        self.cfg = cfg
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = device
        self.eos_token_ids = eos_token_ids
        # Per layer: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_caches = [_zero_kv_layer((2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim), dtype, device)
                          for _ in range(cfg.num_layers)]
        # Blocks [0, kv_prefaulted_blocks) of every layer were faulted in here.
        self.kv_prefaulted_blocks = (prefault_kv_blocks(self.kv_caches, -(-kv_prefault_tokens // block_size))
                                     if kv_prefault_tokens > 0 and device.type == "cpu" else 0)
        backend_cls = get_attention_backend(resolve_backend_name(attention_backend, device.type, dtype))
        self.backend = backend_cls(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 1.0 / math.sqrt(cfg.head_dim))
        self.sampler = Sampler(seed=seed, device=device)
        self.generators: dict[str, torch.Generator] = {}
        # Every running request's block table, kept across steps and updated by the
        # steps' diffs; inputs are built from it with vectorized ops (input_batch.py),
        # or request by request when use_reference_inputs (the reference path).
        self.block_tables = BlockTables()
        self.use_reference_inputs = False
        # KV offload tiers: block copies to/from host memory, run before each forward.
        self.kv_transfer: Optional[KVTransfer] = None
        self._in_step = False  # inside execute(): nested calls (CacheBlend sub-steps) leave tier loads alone
        # Evaluation hook: called with (request id, start position, full log-softmax
        # [n, vocab]) for every prompt position computed in a step, whether or not the
        # request asked for prompt logprobs (so positions after a cached prefix can be
        # scored: prompt-logprob requests never read the cache).  None in serving.
        self.prompt_logprobs_hook: Optional[Callable[[str, int, torch.Tensor], None]] = None
        # Evaluation hook: called with (request ids, full log-softmax of the raw logits
        # [n, vocab]) for the rows sampled in a step, before sampling.  None in serving.
        self.sample_logprobs_hook: Optional[Callable[[list[str], torch.Tensor], None]] = None

    # --------------------------------------------------------------- inputs
    def _build_inputs(self, reqs: list[ScheduledRequest]):
        # Below ~3 requests the per-request path has less fixed overhead than the vectorized one.
        small = len(reqs) < _VECTORIZE_FROM_REQUESTS
        build = build_step_arrays_reference if self.use_reference_inputs or small else build_step_arrays
        a = build(reqs, self.block_tables, self.block_size)
        dev = self.device
        D = a.num_decodes
        dec_tables = dec_lens = dec_mask = None
        if D:
            assert a.decode_tables is not None and a.decode_seq_lens is not None
            mask = np.arange(a.decode_tables.shape[1] * self.block_size)[None, :] < a.decode_seq_lens[:, None]
            dec_tables = torch.from_numpy(a.decode_tables).to(dev)
            dec_lens = torch.from_numpy(a.decode_seq_lens).to(dev)
            dec_mask = torch.from_numpy(mask).to(dev).view(D, 1, 1, -1)  # True = attend
        pre = []
        off = D
        for r, n, table in zip(a.ordered[D:], a.lens[D:].tolist(), a.prefill_tables):
            pre.append(PrefillSeq(off, n, r.start_pos, torch.from_numpy(table).to(dev)))
            off += n
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(a.slots).to(dev),
            num_decode_tokens=D,
            decode_block_tables=dec_tables,
            decode_seq_lens=dec_lens,
            decode_mask=dec_mask,
            prefills=pre,
            block_size=self.block_size,
        )
        return a.ordered, a.lens, torch.from_numpy(a.input_ids).to(dev), torch.from_numpy(a.positions).to(dev), meta

    # -------------------------------------------------------------- execute
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """One step.  With KV tiers, its background loads start (cancelled ones are dropped)
        before anything else, so a step that fails later still starts them, and the output
        reports the tier work finished by the step's end (kv_transfers_done)."""
        transfer = self.kv_transfer
        if transfer is None or self._in_step:  # no tiers, or a sub-step of this step (CacheBlend)
            assert not (sched.kv_fetches or sched.kv_cancels) or transfer is not None, \
                "KV tier loads scheduled without offload tiers"
            return self._run_step(sched)
        self._in_step = True
        try:
            transfer.start(sched.kv_cancels, sched.kv_fetches)
            out = self._run_step(sched)
            out.kv_transfers_done = transfer.finished()
        finally:
            self._in_step = False
        return out

    def _run_step(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in sched.finished_ids:
            self.generators.pop(req_id, None)
        self.block_tables.apply(sched.requests, sched.finished_ids + sched.preempted_ids)
        if sched.kv_saves or sched.kv_loads:
            # Saves first: their blocks may be reused (by a load or this forward).
            assert self.kv_transfer is not None, "KV transfers scheduled without offload tiers"
            self.kv_transfer.apply(sched.kv_saves, sched.kv_loads)
        if any(r.blend is not None for r in sched.requests):
            from kvserve.blend.forward import execute_with_blend  # CacheBlend: chunks placed, a few recomputed

            return execute_with_blend(self, sched)
        out = ModelRunnerOutput()
        if sched.is_empty:
            return out
        ordered, lens, input_ids, positions, meta = self._build_inputs(sched.requests)
        ctx = ForwardContext(backend=self.backend, kv_caches=self.kv_caches, meta=meta)
        hidden = self.model(input_ids, positions, ctx)

        ends = np.cumsum(lens)
        sample_reqs = [r for r in ordered if r.sample]
        sample_idx = [int(ends[i]) - 1 for i, r in enumerate(ordered) if r.sample]
        logits: Optional[torch.Tensor] = None  # of sample_reqs, when verification computed them
        if any(r.num_draft_tokens for r in sample_reqs):  # speculative verification; the rest sample below
            from kvserve.spec_decode.verify_step import verify_drafts

            sample_reqs, logits = verify_drafts(self, hidden, ordered, ends, out)
        hooked = self.prompt_logprobs_hook is not None
        plp_reqs = [(i, r) for i, r in enumerate(ordered) if r.prompt_logprobs or hooked]

        if sample_reqs:
            if logits is None:
                logits = self.model.compute_logits(hidden[sample_idx])
            if self.sample_logprobs_hook is not None:
                self.sample_logprobs_hook([r.request_id for r in sample_reqs], logits.float().log_softmax(-1))
            rows = [self._sampling_row(r) for r in sample_reqs]
            result = self.sampler(logits, rows)
            for r, tok, lp in zip(sample_reqs, result.token_ids, result.logprobs):
                out.sampled[r.request_id] = [SampledToken(tok, lp)]
        for i, r in plp_reqs:
            plp = self._prompt_logprobs(hidden, int(ends[i]) - lens[i], r)
            if r.prompt_logprobs:
                out.prompt_logprobs[r.request_id] = plp
        return out

    def _prompt_logprobs(self, hidden: torch.Tensor, off: int, r: ScheduledRequest) -> list[dict[int, float]]:
        """Logprobs of prompt tokens r.start_pos+1 .. predicted inside this chunk."""
        num_prompt = len(r.prompt_token_ids)
        end = min(r.start_pos + len(r.token_ids), num_prompt - 1)  # last position predicting a prompt token
        n = end - r.start_pos
        if n <= 0:
            return []
        logits = self.model.compute_logits(hidden[off:off + n])
        lp = logits.log_softmax(-1)
        if self.prompt_logprobs_hook is not None:
            self.prompt_logprobs_hook(r.request_id, r.start_pos, lp)
        if not r.prompt_logprobs:
            return []
        targets = torch.tensor(r.prompt_token_ids[r.start_pos + 1:end + 1], dtype=torch.long, device=lp.device)
        return top_logprobs(lp, int(r.sampling_params.prompt_logprobs), targets)

    def _sampling_row(self, r: ScheduledRequest) -> SamplingRow:
        sp = r.sampling_params
        gen: Optional[torch.Generator] = None
        if sp.seed is not None and not sp.greedy:
            gen = self.generators.get(r.request_id)
            if gen is None:
                gen = torch.Generator(device=self.device)
                parent, index = r.generator_key
                gen.manual_seed((sp.seed + 1_000_003 * index) & 0x7FFF_FFFF_FFFF_FFFF)
                self.generators[r.request_id] = gen
        stop_ids = frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else self.eos_token_ids)
        return SamplingRow(sp, r.prompt_token_ids, r.output_token_ids, gen, stop_ids)
