"""Build (once, cached) and load the CPU attention extension.

Compiled with torch.utils.cpp_extension on first use (about a minute on
2 cores; cached under TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions).
If the build fails (no compiler, no ninja), `load()` returns None and the
engine stays on the pure-torch backend, with a warning.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

_SRC = Path(__file__).resolve().parent / "csrc" / "paged_decode_cpu.cpp"
_lock = threading.Lock()
_module: Any = None
_failed = False


def load() -> Optional[Any]:
    global _module, _failed
    with _lock:
        if _module is not None or _failed:
            return _module
        if os.environ.get("KVSERVE_NO_CPU_EXT"):
            _failed = True
            return None
        try:
            from torch.utils.cpp_extension import load as load_ext

            _module = load_ext(
                name="kvserve_paged_decode_cpu",
                sources=[str(_SRC)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as exc:  # build tool or compiler missing: keep serving on the torch path
            logger.warning("CPU attention extension unavailable (%s: %s); using the torch path",
                           type(exc).__name__, exc)
            _failed = True
        return _module
