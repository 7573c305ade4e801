"""One `kvserve` command (`serve`, `router`, ...) as a child process on HOST:PORT, its output in a
log file, and the wait until it answers `GET /health`.

The one copy of "start a kvserve server subprocess and wait for /health": the launcher's Ray actor
(actors.py) uses it, and so do the benchmarks (benchmarks/pd_interference.py,
benchmarks/router_kv_aware.py) and the test harness (tests/e2e/harness.py).  It lives in the
package, not under tests/, because the actor runs it on every node of a Ray cluster, where only
the package is installed.

  proc = CliProcess(["serve", MODEL, "--no-access-log"], Path("serve.log"))
  wait_healthy([proc], timeout_s=600)   # RuntimeError if it exits, TimeoutError if it is late
  ... proc.url ...
  proc.stop()                           # SIGTERM (the server drains), SIGKILL after a timeout

The command runs as `python -m kvserve.entrypoints.cli` from the checkout this module belongs to
(cwd = the repository root when there is one), so a test or a benchmark exercises the code under
test, not an installed copy.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import httpx

_PR_SET_PDEATHSIG = 1
try:  # resolved here, not in the forked child
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the owner's own stop() still ends the child
    _PRCTL = None

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the kvserve package


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _child_setup(cores: Optional[Sequence[int]], die_with_parent: bool) -> None:
    """Runs in the child between fork and exec (keep it to system calls)."""
    if die_with_parent and _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if cores:
        os.sched_setaffinity(0, set(cores))


class CliProcess:
    """`python -m kvserve.entrypoints.cli ARGV... --host HOST --port PORT` (port: a free one).

    `cores`: the CPU affinity of the child (inherited by the engine process it spawns), with
    OMP_NUM_THREADS = their number, which sets torch's intra-op threads.  `die_with_parent`: the
    child gets PR_SET_PDEATHSIG(SIGKILL), so it cannot outlive its owner (the Ray actor).
    `env` is added to this process's environment."""

    def __init__(self, argv: Sequence[str], log_path: Path, *, host: str = "127.0.0.1",
                 port: Optional[int] = None, env: Optional[dict[str, str]] = None,
                 cores: Optional[Sequence[int]] = None, die_with_parent: bool = False) -> None:
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.host = host
        self.port = port or free_port(host)
        self.cores = sorted(cores or [])
        full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {})}
        if self.cores:
            full_env["OMP_NUM_THREADS"] = str(len(self.cores))
        cmd = [sys.executable, "-m", "kvserve.entrypoints.cli", *self.argv, "--host", host, "--port", str(self.port)]
        self._log = open(self.log_path, "wb")
        cores_ = list(self.cores)
        self.proc = subprocess.Popen(cmd, cwd=_PACKAGE_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=full_env, preexec_fn=lambda: _child_setup(cores_, die_with_parent))

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> Optional[int]:
        """The exit status, or None while it runs."""
        return self.proc.poll()

    def is_healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_text()[-num_chars:]

    def stop(self, timeout_s: float = 60.0) -> Optional[int]:
        """SIGTERM (a server drains), then SIGKILL after `timeout_s`; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def wait_healthy(procs: Sequence[CliProcess], timeout_s: float = 600.0, interval_s: float = 0.2) -> None:
    """Until every one of `procs` answers `GET /health` with 200.  If one exits first
    (RuntimeError) or they are not all healthy within `timeout_s` (TimeoutError), all of them are
    stopped and the error carries the failed one's log tail."""
    deadline = time.monotonic() + timeout_s
    waiting = list(procs)
    while waiting:
        for p in waiting:
            if p.poll() is not None:
                _stop_all(procs)
                raise RuntimeError(f"`kvserve {' '.join(p.argv[:1])}` at {p.url} exited with {p.proc.returncode} "
                                   f"during start-up (log {p.log_path}):\n{p.log_tail()}")
        waiting = [p for p in waiting if not p.is_healthy()]
        if not waiting:
            return
        if time.monotonic() > deadline:
            _stop_all(procs)
            p = waiting[0]
            raise TimeoutError(f"`kvserve {' '.join(p.argv[:1])}` at {p.url} not healthy after {timeout_s:g} s "
                               f"(log {p.log_path}):\n{p.log_tail()}")
        time.sleep(interval_s)


def _stop_all(procs: Sequence[CliProcess]) -> None:
    for p in procs:
        p.stop(10.0)
