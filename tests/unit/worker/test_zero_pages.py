"""The CPU KV pool comes from untouched anonymous pages (kvserve.utils.cpu_alloc.zero_pages):
same contents as torch.zeros, writable, and the mapping goes away with the tensor."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from kvserve.utils.cpu_alloc import zero_pages


def _vm_size_kib() -> int:
    """Virtual size of this process (adjacent anonymous mappings merge, so count bytes, not maps)."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmSize:"))
    return int(line.split()[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_pages_equal_torch_zeros_and_writable(dtype: torch.dtype) -> None:
    shape = (2, 7, 16, 3, 8)
    t = zero_pages(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t, torch.zeros(shape, dtype=dtype))
    t[1, 3] = 2.5
    assert t.sum().item() == pytest.approx(2.5 * 16 * 3 * 8)
    assert torch.count_nonzero(t[0]).item() == 0


def test_zero_pages_mapping_released_with_tensor() -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    gc.collect()
    before = _vm_size_kib()
    tensors = [zero_pages((16 << 20,), torch.float32) for _ in range(8)]  # 64 MiB each: 512 MiB in all
    view = tensors[0][10:20]  # a view keeps its buffer alive on its own
    assert _vm_size_kib() >= before + 8 * 65536
    del tensors
    gc.collect()
    view.fill_(1.0)  # still valid memory
    del view
    gc.collect()
    assert _vm_size_kib() <= before + 65536  # all eight mappings gone (slack: unrelated allocations)


def test_runner_kv_pool_is_zero(tmp_path: Path) -> None:
    from kvserve.worker.model_runner import _zero_kv_layer

    layer = _zero_kv_layer((2, 4, 16, 2, 8), torch.float32, torch.device("cpu"))
    assert torch.count_nonzero(layer).item() == 0


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_zero_pages_asks_for_transparent_huge_pages() -> None:
    """With THP in 'madvise' (or 'always') mode, written zero_pages memory is backed by 2 MB pages;
    huge_pages=False keeps 4 KB pages under 'madvise'."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this kernel")
    t = zero_pages((8 << 20,), torch.float32)  # 32 MiB
    t.fill_(1.0)
    assert _anon_huge_kib(t.data_ptr()) >= 4096  # at least two 2 MB pages
    if "[madvise]" in thp.read_text():
        small = zero_pages((8 << 20,), torch.float32, huge_pages=False)
        small.fill_(1.0)
        assert _anon_huge_kib(small.data_ptr()) == 0
