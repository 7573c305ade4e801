"""The first blocks of the CPU KV pool are faulted in at start-up (kvserve.worker.kv_prefault,
kvserve.utils.cpu_alloc.populate), without changing any contents; the rest stays untouched."""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from pathlib import Path

import pytest
import torch

from kvserve.sampling_params import SamplingParams
from kvserve.utils.cpu_alloc import populate, zero_pages
from kvserve.worker.kv_prefault import prefault_kv_blocks

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and MADV_POPULATE_WRITE: Linux")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _resident_kib(t: torch.Tensor, start: int = 0, nbytes: int | None = None) -> int:
    """KiB of bytes [start, start + nbytes) of `t` whose pages are resident (mincore)."""
    nbytes = t.numel() * t.element_size() - start if nbytes is None else nbytes
    address = t.data_ptr() + start
    assert address % mmap.PAGESIZE == 0 and nbytes % mmap.PAGESIZE == 0
    pages = nbytes // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    assert _libc.mincore(address, nbytes, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) * mmap.PAGESIZE // 1024


def _pool(num_blocks: int) -> torch.Tensor:
    # [2, num_blocks, 16, 4, 16] float32: 4 KiB per block and half; 4 KB pages, so a block is one page.
    return zero_pages((2, num_blocks, 16, 4, 16), torch.float32, huge_pages=False)


def test_populate_maps_pages_without_changing_contents() -> None:
    t = _pool(64)
    t[0, 5] = 3.0  # written before: must survive
    assert _resident_kib(t) < 2 * 64 * 4
    if not populate(t, 0, t.numel() * 4):
        pytest.skip("MADV_POPULATE_WRITE unsupported by this kernel")
    assert _resident_kib(t) == 2 * 64 * 4  # the whole 512 KiB is now resident
    assert torch.count_nonzero(t).item() == 16 * 4 * 16
    assert torch.all(t[0, 5] == 3.0)


def test_sync_part_faults_exactly_the_first_blocks_of_both_halves_of_every_layer() -> None:
    layers = [_pool(256) for _ in range(3)]  # 2 MiB per layer
    done = prefault_kv_blocks(layers, 40)
    if done == 0 and not populate(_pool(1), 0, 4096):
        pytest.skip("MADV_POPULATE_WRITE unsupported by this kernel")
    assert done == 40
    assert prefault_kv_blocks([_pool(16)], 40) == 16  # capped at the pool
    for layer in layers:
        half = 256 * 4096
        for h in (0, 1):  # blocks 0-39 of the K and the V half resident, nothing past them
            assert _resident_kib(layer, h * half, 40 * 4096) == 40 * 4
            assert _resident_kib(layer, h * half + 40 * 4096, 216 * 4096) == 0
        assert torch.count_nonzero(layer).item() == 0


def test_engine_faults_in_four_steps_of_kv_at_start(tmp_path: Path) -> None:
    from kvserve.engine.engine_core import KV_PREFAULT_STEPS
    from kvserve.engine.llm import LLM
    from tests.helpers.tiny_models import build_tiny_model

    model = build_tiny_model("llama-tied", tmp_path / "m", seed=0)
    with LLM(model=str(model), block_size=16, num_kv_blocks=512, max_num_batched_tokens=256,
             max_model_len=512, dtype="float32") as llm:
        if not populate(_pool(1), 0, 4096):
            pytest.skip("MADV_POPULATE_WRITE unsupported by this kernel")
        assert llm.engine.core.executor.kv_prefaulted_blocks >= KV_PREFAULT_STEPS * 256 // 16  # 64 before the first step
        out = llm.generate([{"prompt_token_ids": list(range(1, 40))}], SamplingParams(max_tokens=4, temperature=0.0),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
