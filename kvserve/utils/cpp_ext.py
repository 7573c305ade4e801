"""Build (once, cached) and load one of kvserve's C++ CPU extensions.

Each extension is compiled with torch.utils.cpp_extension on first use (a minute or
so on 2 cores) and cached under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions),
in a directory named by a digest of the source's path, content and flags.  When the build
fails (no compiler, no ninja) `load()` returns None, with a warning, and the caller stays
on its pure-torch path.  KVSERVE_NO_CPU_EXT=1 turns every extension off.

Concurrent builds (several engine processes starting at once) are serialised by an flock
on the build directory, which the kernel releases when its holder dies.  torch's own build
lock is a plain file (`lock`) that a build killed midway leaves behind, after which every
later build waits for it forever; holding the flock proves no build is running, so a
`lock` file found then is stale and removed.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

logger = logging.getLogger(__name__)

DISABLE_ENV = "KVSERVE_NO_CPU_EXT"
DEFAULT_CFLAGS = ("-O3", "-march=native", "-fopenmp")
DEFAULT_LDFLAGS = ("-fopenmp",)


class CppExtension:
    """One C++ source built into a Python module named `name`, loaded at most once per process."""

    def __init__(self, name: str, source: Path, what: str, cflags: Sequence[str] = DEFAULT_CFLAGS,
                 ldflags: Sequence[str] = DEFAULT_LDFLAGS, includes: Sequence[Path] = ()) -> None:
        """`includes`: other sources that `source` #includes; their content is in the build's digest."""
        self.name = name
        self.source = source
        self.includes = tuple(includes)
        self.what = what  # for messages: "the CPU attention extension"
        self.cflags = tuple(cflags)
        self.ldflags = tuple(ldflags)
        self._lock = threading.Lock()
        self._module: Any = None
        self._failed = False

    def load(self) -> Optional[Any]:
        with self._lock:
            if self._module is not None or self._failed:
                return self._module
            if os.environ.get(DISABLE_ENV):
                self._failed = True
                return None
            try:
                self._module = self._build_and_load()
            except Exception as exc:  # build tool or compiler missing: the caller keeps its torch path
                logger.warning("%s unavailable (%s: %s); using the torch path", self.what, type(exc).__name__, exc)
                self._failed = True
            return self._module

    def build_directory(self) -> Path:
        """One directory per digest of the source's path, content (with its includes') and flags.  The path is in
        it because the build file names the source by path: two checkouts sharing one
        directory would each see the other's build as stale and rebuild it, over and over."""
        from torch.utils.cpp_extension import _get_build_directory

        flags = " ".join(self.cflags + self.ldflags).encode()
        content = self.source.read_bytes() + b"".join(path.read_bytes() for path in self.includes)
        digest = hashlib.sha256(str(self.source).encode() + content + flags).hexdigest()[:16]
        return Path(_get_build_directory(self.name, verbose=False)).parent / f"{self.name}_{digest}"

    def _build_and_load(self) -> Any:
        from torch.utils.cpp_extension import load as load_ext

        build_dir = self.build_directory()
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir / ".kvserve-build.lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if this process dies
            stale = build_dir / "lock"
            if stale.exists():
                logger.warning("removing a stale build lock left by a killed build: %s", stale)
                stale.unlink()
            if not any(build_dir.glob(f"{self.name}*.so")):
                logger.info("building %s in %s (once, about a minute)", self.what, build_dir)
            # Copies: torch appends its own flags to the lists it is given.
            return load_ext(name=self.name, sources=[str(self.source)], extra_cflags=list(self.cflags),
                            extra_ldflags=list(self.ldflags), build_directory=str(build_dir), verbose=False)
