"""ModelRunner: execute(SchedulerOutput) -> ModelRunnerOutput.

Owns the model weights, the per-layer KV pools and the sampler; makes no
policy decisions.  Step inputs are built with NumPy on the host and moved to
the device once per step; the attention metadata is built once and shared by
every layer.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from kvserve.models.model_config import ModelArchConfig
from kvserve.protocol import (
    AttentionMetadata, ForwardContext, ModelRunnerOutput, PrefillSeq, SampledToken, ScheduledRequest, SchedulerOutput,
)
from kvserve.worker.attention import get_attention_backend, resolve_backend_name
from kvserve.worker.kv_transfer import KVTransfer
from kvserve.worker.sampler import Sampler, SamplingRow, top_logprobs


def kv_block_bytes(cfg: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def positions_array(r: ScheduledRequest) -> np.ndarray:
    """The step's positions of `r` as int64.  This runner computes contiguous runs
    (prefill chunks, decodes); a subset of positions (blending) is refused clearly."""
    p = r.positions
    n = len(r.token_ids)
    if isinstance(p, range):
        if p.step == 1 and len(p) == n and p.start == r.start_pos:
            return np.arange(p.start, p.stop, dtype=np.int64)
    else:
        arr = np.asarray(p, dtype=np.int64)
        if arr.shape == (n,) and n > 0 and arr[0] == r.start_pos and (n == 1 or bool((np.diff(arr) == 1).all())):
            return arr
    raise ValueError(f"request {r.request_id}: the model runner computes contiguous positions from "
                     f"start_pos={r.start_pos} for its {n} tokens, got {list(p)[:8]}")


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: ModelArchConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, eos_token_ids: frozenset[int],
                 attention_backend: str = "auto", seed: int = 0) -> None:
        self.model = model
        self.cfg = cfg
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = device
        self.eos_token_ids = eos_token_ids
        # Per layer: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_caches = [
            torch.zeros((2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim), dtype=dtype, device=device)
            for _ in range(cfg.num_layers)
        ]
        backend_cls = get_attention_backend(resolve_backend_name(attention_backend, device.type, dtype))
        self.backend = backend_cls(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 1.0 / math.sqrt(cfg.head_dim))
        self.sampler = Sampler(seed=seed, device=device)
        self.generators: dict[str, torch.Generator] = {}
        # KV offload tiers: block copies to/from host memory, run before each forward.
        self.kv_transfer: Optional[KVTransfer] = None
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
        bs = self.block_size
        decodes = [r for r in reqs if len(r.token_ids) == 1]
        prefills = [r for r in reqs if len(r.token_ids) > 1]
        ordered = decodes + prefills
        lens = np.fromiter((len(r.token_ids) for r in ordered), dtype=np.int64, count=len(ordered))
        T = int(lens.sum())
        input_ids = np.empty(T, dtype=np.int64)
        positions = np.empty(T, dtype=np.int64)
        slots = np.empty(T, dtype=np.int64)
        off = 0
        for r in ordered:
            n = len(r.token_ids)
            input_ids[off:off + n] = r.token_ids
            pos = positions_array(r)
            positions[off:off + n] = pos
            table = np.asarray(r.block_ids, dtype=np.int64)
            slots[off:off + n] = table[pos // bs] * bs + pos % bs
            off += n
        dev = self.device
        D = len(decodes)
        dec_tables = dec_lens = dec_mask = None
        if D:
            seq_lens = np.fromiter((r.start_pos + 1 for r in decodes), dtype=np.int64, count=D)
            max_blocks = int(-(-seq_lens.max() // bs))
            tables = np.zeros((D, max_blocks), dtype=np.int64)
            for i, r in enumerate(decodes):
                nb = -(-int(seq_lens[i]) // bs)
                tables[i, :nb] = r.block_ids[:nb]
            mask = np.arange(max_blocks * bs)[None, :] < seq_lens[:, None]  # True = attend
            dec_tables = torch.from_numpy(tables).to(dev)
            dec_lens = torch.from_numpy(seq_lens).to(dev)
            dec_mask = torch.from_numpy(mask).to(dev).view(D, 1, 1, -1)
        pre = []
        off = D
        for r in prefills:
            n = len(r.token_ids)
            nb = -(-(r.start_pos + n) // bs)
            pre.append(PrefillSeq(off, n, r.start_pos, torch.tensor(r.block_ids[:nb], dtype=torch.long, device=dev)))
            off += n
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            num_decode_tokens=D,
            decode_block_tables=dec_tables,
            decode_seq_lens=dec_lens,
            decode_mask=dec_mask,
            prefills=pre,
            block_size=bs,
        )
        return ordered, lens, torch.from_numpy(input_ids).to(dev), torch.from_numpy(positions).to(dev), meta

    # -------------------------------------------------------------- execute
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in sched.finished_ids:
            self.generators.pop(req_id, None)
        if sched.kv_saves or sched.kv_loads:
            # Saves first: their blocks may be reused (by a load or this forward).
            assert self.kv_transfer is not None, "KV transfers scheduled without offload tiers"
            self.kv_transfer.apply(sched.kv_saves, sched.kv_loads)
        out = ModelRunnerOutput()
        if sched.is_empty:
            return out
        ordered, lens, input_ids, positions, meta = self._build_inputs(sched.requests)
        ctx = ForwardContext(backend=self.backend, kv_caches=self.kv_caches, meta=meta)
        hidden = self.model(input_ids, positions, ctx)

        ends = np.cumsum(lens)
        sample_reqs = [r for r in ordered if r.sample]
        sample_idx = [int(ends[i]) - 1 for i, r in enumerate(ordered) if r.sample]
        hooked = self.prompt_logprobs_hook is not None
        plp_reqs = [(i, r) for i, r in enumerate(ordered) if r.prompt_logprobs or hooked]

        if sample_reqs:
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
