"""CPU backend: the torch backend with decodes run by a C++ paged kernel.

Decode attention dominates CPU decode steps once contexts reach a few hundred
tokens; the kernel (csrc/paged_decode_cpu.cpp) reads each cached K/V row once
from the pool instead of gathering a padded copy.  Prefill chunks stay on the
torch path (SDPA's flash kernel is already compute-efficient there).  Tested
equal to the reference backend in tests/unit/test_attention_backends.py.
"""
from __future__ import annotations

import torch

from kvserve.worker.attention import cpu_ext
from kvserve.worker.attention.torch_paged import TorchPagedAttention


class CpuPagedAttention(TorchPagedAttention):
    name = "cpu"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ext = cpu_ext.load()
        if self._ext is None:
            raise RuntimeError("the CPU attention extension could not be built")

    def _decode(self, q: torch.Tensor, cache: torch.Tensor, meta) -> torch.Tensor:
        if q.dtype != torch.float32 or q.device.type != "cpu":
            return super()._decode(q, cache, meta)
        return self._ext.paged_decode_attention(q, cache[0], cache[1], meta.decode_block_tables,
                                                meta.decode_seq_lens, self.scale)
