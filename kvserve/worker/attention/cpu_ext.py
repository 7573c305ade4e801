"""Build (once, cached) and load the CPU attention extension.

Compiled with torch.utils.cpp_extension on first use (about a minute on
2 cores; cached under TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions,
in a directory named by a digest of the source and flags).
If the build fails (no compiler, no ninja), `load()` returns None and the
engine stays on the pure-torch backend, with a warning.

Concurrent builds (several engine processes starting at once) are serialised
by an flock on the build directory, which the kernel releases when its holder
dies.  torch's own build lock is a plain file (`lock`) that a build killed
midway leaves behind, after which every later build waits for it forever;
holding the flock proves no build is running, so a `lock` file found then is
stale and removed.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

_SRC = Path(__file__).resolve().parent / "csrc" / "paged_decode_cpu.cpp"
_NAME = "kvserve_paged_decode_cpu"
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
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
            _module = _build_and_load()
        except Exception as exc:  # build tool or compiler missing: keep serving on the torch path
            logger.warning("CPU attention extension unavailable (%s: %s); using the torch path",
                           type(exc).__name__, exc)
            _failed = True
        return _module


def build_directory() -> Path:
    """Where this source and these flags are built: one directory per digest of the source's
    path, content and flags.  The path is in it because the build file names the source by
    path: two checkouts sharing one directory would each see the other's build as stale and
    rebuild it, over and over."""
    from torch.utils.cpp_extension import _get_build_directory

    digest = hashlib.sha256(str(_SRC).encode() + _SRC.read_bytes() + " ".join(_CFLAGS + _LDFLAGS).encode()).hexdigest()[:16]
    return Path(_get_build_directory(_NAME, verbose=False)).parent / f"{_NAME}_{digest}"


def _build_and_load() -> Any:
    from torch.utils.cpp_extension import load as load_ext

    build_dir = build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".kvserve-build.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if this process dies
        stale = build_dir / "lock"
        if stale.exists():
            logger.warning("removing a stale build lock left by a killed build: %s", stale)
            stale.unlink()
        if not any(build_dir.glob(f"{_NAME}*.so")):
            logger.info("building the CPU attention extension in %s (once, about a minute)", build_dir)
        # Copies: torch appends its own flags to the lists it is given.
        return load_ext(name=_NAME, sources=[str(_SRC)], extra_cflags=list(_CFLAGS), extra_ldflags=list(_LDFLAGS),
                        build_directory=str(build_dir), verbose=False)
