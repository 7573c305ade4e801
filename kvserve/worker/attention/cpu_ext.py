"""The CPU attention extensions, each built once and cached.

- csrc/paged_decode_cpu.cpp: single-token decode queries (`load()`).
- csrc/paged_prefill_cpu.cpp: every prefill chunk / multi-query (speculative verify)
  sequence of a step in one call (`load_prefill()`).

How they are built, cached and guarded against concurrent or killed builds:
kvserve.utils.cpp_ext.  A loader returns None when its extension cannot be built; the
engine then stays on the pure-torch path for that part, with a warning.

The prefill kernel has AVX-512, AVX2 and portable vector paths chosen at compile time;
`load_prefill(isa)` builds the one for `isa` ("native" = this CPU's best, "avx2",
"portable") so the tests can hold each path equal to the reference on one machine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from kvserve.utils.cpp_ext import DEFAULT_CFLAGS, DEFAULT_LDFLAGS, CppExtension

_CSRC = Path(__file__).resolve().parent / "csrc"
_EXT = CppExtension("kvserve_paged_decode_cpu", _CSRC / "paged_decode_cpu.cpp", "the CPU attention extension")

# -march values per vector path of the prefill kernel; "native" is what the engine uses.
_PREFILL_MARCH = {"native": "-march=native", "avx2": "-march=haswell", "portable": "-march=x86-64"}
_PREFILL: dict[str, CppExtension] = {
    isa: CppExtension(
        "kvserve_paged_prefill_cpu" + ("" if isa == "native" else f"_{isa}"), _CSRC / "paged_prefill_cpu.cpp",
        f"the CPU prefill attention extension ({isa})",
        cflags=tuple(march if f == "-march=native" else f for f in DEFAULT_CFLAGS), ldflags=DEFAULT_LDFLAGS)
    for isa, march in _PREFILL_MARCH.items()
}


def load() -> Optional[Any]:
    return _EXT.load()


def load_prefill(isa: str = "native") -> Optional[Any]:
    return _PREFILL[isa].load()


def build_directory() -> Path:
    return _EXT.build_directory()
