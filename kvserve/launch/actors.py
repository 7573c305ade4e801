"""The Ray actor behind each instance and the router: one `kvserve` command as its child process.

The actor class is plain Python (the launcher wraps it with `ray.remote`), so this module imports
without Ray.  The command is the ordinary CLI (`python -m kvserve.entrypoints.cli serve|router ...`),
so an instance under Ray behaves exactly like one started by hand, drain on SIGTERM included.

Pinning: the child is started with its CPU affinity set to the actor's share of the node's cores
(os.sched_setaffinity in the child before exec, inherited by the engine process it spawns) and
OMP_NUM_THREADS = that many cores, which sets torch's intra-op threads.  Lifetime: the child gets
PR_SET_PDEATHSIG(SIGKILL), so an actor that dies (ray.kill, a crashed worker) takes its server
with it; the server's engine process exits on its own when its parent is gone (EOF on its pipe).
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import httpx

_PR_SET_PDEATHSIG = 1
try:  # resolved here, not in the forked child
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the launcher's own stop() still ends the child
    _PRCTL = None


def _child_setup(cores: Optional[Sequence[int]]) -> None:
    """Runs in the child between fork and exec (keep it to system calls)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if cores:
        os.sched_setaffinity(0, set(cores))


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ProcessActor:
    """Runs `kvserve ARGV...` and reports on it; every method returns plain data."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.url: Optional[str] = None
        self.cores: list[int] = []
        self.log_path = Path(tempfile.gettempdir()) / f"kvserve-launch-{os.getpid()}-{name}.log"

    def node_info(self) -> dict[str, Any]:
        """Where this actor runs: the node's IP and id, and the cores this process may use."""
        import ray

        return {"ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "cores": sorted(os.sched_getaffinity(0))}

    def start(self, argv: list[str], host: str, cores: Optional[list[int]], env: dict[str, str],
              port: Optional[int] = None, timeout_s: float = 600.0) -> dict[str, Any]:
        """Start `kvserve <argv> --host HOST --port PORT` (default: a free port) pinned to `cores`;
        wait until its /health answers 200.  Returns {"url", "pid", "cores", "log"}; RuntimeError
        with the log's tail if it exits or does not become healthy within `timeout_s`."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name} is already started")
        port = port or free_port(host)
        full_env = dict(os.environ, **env, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        if cores:
            full_env["OMP_NUM_THREADS"] = str(len(cores))
        self.cores = list(cores or [])
        cmd = [sys.executable, "-m", "kvserve.entrypoints.cli", *argv, "--host", host, "--port", str(port)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                         preexec_fn=lambda: _child_setup(cores))
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{url_host}:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop(5.0)
                raise RuntimeError(f"{self.name} not healthy after {timeout_s:g} s:\n{self.log_tail()}")
            time.sleep(0.2)
        return {"url": self.url, "pid": self.proc.pid, "cores": self.cores, "log": str(self.log_path)}

    def poll(self) -> Optional[int]:
        """The child's exit status, or None while it runs."""
        return self.proc.poll() if self.proc is not None else None

    def stop(self, timeout_s: float = 30.0) -> Optional[int]:
        """SIGTERM (the server drains), then SIGKILL after `timeout_s`; returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def log_tail(self, num_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-num_bytes:].decode(errors="replace")
