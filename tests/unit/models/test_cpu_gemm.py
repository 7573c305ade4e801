"""kvserve's blocked CPU linear kernel (kvserve/models/csrc/cpu_model_ops.cpp) against F.linear:
every microkernel height (1-6 rows on AVX2, 1-12 on AVX-512, and several row strips), K slices
(K above the kernel's 256-wide slice, K not a multiple of 8), an even and an odd number of column
blocks (the AVX-512 path takes blocks in pairs), a partial last block, bias or none, empty input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvserve.models import cpu_gemm

ext = cpu_gemm.load()
pytestmark = pytest.mark.skipif(ext is None, reason="the CPU model kernels cannot be built here (no compiler)")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 25, 32, 100, 1000])
@pytest.mark.parametrize("k", [20, 576, 600])
@pytest.mark.parametrize("n", [96, 80])  # 6 and 5 column blocks
def test_blocked_linear_equals_f_linear(rows: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    packed = cpu_gemm.pack_weight(w)
    assert packed.shape == (n // 16, k, 16)
    torch.testing.assert_close(cpu_gemm.linear(x, packed, b, n), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu_gemm.linear(x, packed, None, n), F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [1, 15, 17, 37])
def test_partial_last_block_writes_only_real_columns(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    w, b, x = torch.randn(n, 300, generator=g), torch.randn(n, generator=g), torch.randn(9, 300, generator=g)
    y = ext.blocked_linear(x, cpu_gemm.pack_weight(w), b, n)
    assert y.shape == (9, n)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_large_panel_rows_and_empty_input() -> None:
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(32, 1536, generator=g), torch.randn(700, 1536, generator=g)  # > one row panel
    packed = cpu_gemm.pack_weight(w)
    torch.testing.assert_close(cpu_gemm.linear(x, packed, None, 32), F.linear(x, w), rtol=1e-5, atol=1e-3)
    assert cpu_gemm.linear(torch.empty(0, 1536), packed, None, 32).shape == (0, 32)


def test_shape_errors_are_clear() -> None:
    packed = cpu_gemm.pack_weight(torch.randn(32, 8))
    with pytest.raises(RuntimeError, match="columns"):
        ext.blocked_linear(torch.randn(2, 9), packed, None, 32)
    with pytest.raises(RuntimeError, match="does not fit"):
        ext.blocked_linear(torch.randn(2, 8), packed, None, 40)
