"""CPU backend: the torch backend with attention run by C++ paged kernels.

- Decodes (single-token queries): csrc/paged_decode_cpu.cpp reads each cached K/V row once
  from the pool instead of gathering a padded copy.
- Every prefill chunk of the step (fresh prompts, chunks after a cached prefix,
  speculative-verification queries) goes to csrc/paged_prefill_cpu.cpp in one call: causal
  flash-style attention straight from the block tables, no gathered context, no mask.
  Without that extension, or with KVSERVE_CPU_PREFILL=0 (for A/B runs), prefills stay on
  the torch path (the reference for both).

Tested equal to the reference backend in tests/unit/test_attention_backends.py and
tests/unit/test_cpu_attention_prefill.py.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from kvserve.worker.attention import cpu_ext
from kvserve.worker.attention.torch_paged import TorchPagedAttention


def pack_prefill_chunks(prefills) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's chunk descriptors for the prefill kernel: chunks [N, 4] int64 rows of
    (q_start, q_len, start_pos, offset of the chunk's block ids), and all tables concatenated."""
    rows, off = [], 0
    for p in prefills:
        rows.append((p.q_start, p.q_len, p.start_pos, off))
        off += p.block_ids.numel()
    chunks = torch.tensor(rows, dtype=torch.int64)
    block_ids = torch.cat([p.block_ids.reshape(-1) for p in prefills]).to(torch.int64)
    return chunks, block_ids


class CpuPagedAttention(TorchPagedAttention):
    name = "cpu"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ext = cpu_ext.load()
        if self._ext is None:
            raise RuntimeError("the CPU attention extension could not be built")
        self._prefill_ext: Optional[Any] = (None if os.environ.get("KVSERVE_CPU_PREFILL") == "0"
                                            else cpu_ext.load_prefill())
        # The packed chunk descriptors of the step being run, built by its first layer and
        # reused by the others (all layers of a step share one AttentionMetadata).
        self._packed_for: Any = None
        self._packed: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def _prefill(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 cache: torch.Tensor, meta) -> None:
        if self._prefill_ext is None or q.dtype != torch.float32 or q.device.type != "cpu":
            super()._prefill(out, q, k, v, cache, meta)
            return
        if self._packed_for is not meta:
            self._packed, self._packed_for = pack_prefill_chunks(meta.prefills), meta
        chunks, block_ids = self._packed
        self._prefill_ext.paged_prefill_attention(out, q, cache[0], cache[1], chunks, block_ids, self.scale)

    def _decode(self, q: torch.Tensor, cache: torch.Tensor, meta) -> torch.Tensor:
        if q.dtype != torch.float32 or q.device.type != "cpu":
            return super()._decode(q, cache, meta)
        return self._ext.paged_decode_attention(q, cache[0], cache[1], meta.decode_block_tables,
                                                meta.decode_seq_lens, self.scale)
