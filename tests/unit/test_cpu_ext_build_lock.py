"""A build killed midway must not make every later engine start hang.

torch's extension build lock is a plain file; a build killed while compiling (a test timeout, Ctrl-C,
an OOM kill) leaves it behind and every later `load` waits on it forever, with nothing logged.  The
loader serialises builds with an flock instead and clears a leftover lock file.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from kvserve.worker.attention import cpu_ext

LOAD = "from kvserve.worker.attention import cpu_ext; m = cpu_ext.load(); print('loaded' if m else 'none')"


def test_a_stale_build_lock_is_cleared_and_the_extension_loads() -> None:
    if cpu_ext.load() is None:
        pytest.skip("the CPU extension cannot be built on this machine (no compiler)")
    stale = cpu_ext.build_directory() / "lock"
    stale.write_text("")  # what a build killed midway leaves behind
    done = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "loaded"
    assert not stale.exists()
    assert "stale build lock" in done.stderr


def test_build_directory_depends_on_the_source() -> None:
    a = cpu_ext.build_directory()
    assert a.name.startswith("kvserve_paged_decode_cpu_") and len(a.name.split("_")[-1]) == 16
    assert a == cpu_ext.build_directory()  # stable for one source
