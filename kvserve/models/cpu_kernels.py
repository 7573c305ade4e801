"""The C++ CPU model kernels (csrc/cpu_model_ops.cpp): built once, cached, loaded on first use.

`load()` is None where the extension cannot be built (no compiler), or with
KVSERVE_NO_CPU_EXT=1; callers then keep their torch paths.  Users: the blocked linear
(kvserve.models.cpu_gemm) and the fused layer ops (kvserve.models.fused_ops).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from kvserve.utils.cpp_ext import CppExtension

_EXT = CppExtension("kvserve_cpu_model_ops", Path(__file__).resolve().parent / "csrc" / "cpu_model_ops.cpp",
                    "the CPU model kernels extension")


def load() -> Optional[Any]:
    return _EXT.load()
