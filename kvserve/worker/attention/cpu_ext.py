"""The CPU attention extension (csrc/paged_decode_cpu.cpp), built once and cached.

How it is built, cached and guarded against concurrent or killed builds:
kvserve.utils.cpp_ext.  `load()` returns None when it cannot be built; the engine then
stays on the pure-torch attention backend, with a warning.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from kvserve.utils.cpp_ext import CppExtension

_EXT = CppExtension("kvserve_paged_decode_cpu", Path(__file__).resolve().parent / "csrc" / "paged_decode_cpu.cpp",
                    "the CPU attention extension")


def load() -> Optional[Any]:
    return _EXT.load()


def build_directory() -> Path:
    return _EXT.build_directory()
