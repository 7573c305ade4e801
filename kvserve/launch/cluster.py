"""The Ray cluster the launcher uses: an existing one (`--ray-address`), or a local one it starts.

A local cluster is `ray start --head --block` as a child process (stopped with SIGTERM, which
stops exactly that cluster's processes; nothing else on the machine is touched), with every port
chosen here.  Choosing the dashboard-agent and metrics ports up front matters on a loaded
machine: left to Ray, the raylet waits a fixed time for the agent to report its port and aborts
when the agent starts slowly.  Ray is an optional dependency, imported only here and in the
launcher; `require_ray()` says how to install it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from kvserve.launch.actors import free_port

logger = logging.getLogger(__name__)


class RayMissingError(RuntimeError):
    pass


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayMissingError("launching with --replicas/--pd needs Ray: pip install ray") from None
    return ray


def ray_executable() -> str:
    """The `ray` CLI of this interpreter's environment."""
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


# Ray's start-up waits, raised from their defaults (tens of seconds), which a loaded 2-core machine exceeds.
_PATIENT_RAY = {"RAY_agent_register_timeout_ms": "300000", "RAY_raylet_start_wait_time_s": "300"}


class LocalRayCluster:
    """`ray start --head --block` on this machine with `num_cpus` CPUs; `stop()` ends it."""

    def __init__(self, num_cpus: float, host: str = "127.0.0.1", log_dir: Optional[Path] = None) -> None:
        self.num_cpus = num_cpus
        self.host = host
        self.port = free_port(host)
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.log_path = (log_dir or Path("/tmp")) / f"kvserve-ray-head-{os.getpid()}.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 300.0) -> str:
        ports = [free_port(self.host) for _ in range(4)]
        cmd = [ray_executable(), "start", "--head", "--block", "--port", str(self.port),
               "--node-ip-address", self.host, "--num-cpus", f"{self.num_cpus:g}", "--num-gpus", "0",
               "--include-dashboard=false", "--disable-usage-stats",
               "--dashboard-agent-grpc-port", str(ports[0]), "--dashboard-agent-listen-port", str(ports[1]),
               "--metrics-export-port", str(ports[2]), "--runtime-env-agent-port", str(ports[3])]
        # A slow (loaded) machine starts Ray's agents slowly; the raylet must not give up on them.
        env = dict(os.environ)
        for name, value in _PATIENT_RAY.items():
            env.setdefault(name, value)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # Ctrl-C goes to us, not to Ray
        deadline = time.monotonic() + timeout_s
        marker = b"block forever"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {self.proc.returncode}:\n{self.log_tail()}")
            if marker in self.log_path.read_bytes():
                return self.address
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the local Ray cluster did not start within {timeout_s:g} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 30.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops the processes it started
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("the local Ray cluster did not stop within %g s; killing its head process", timeout_s)
            proc.kill()
            proc.wait(10)

    def log_tail(self, num_bytes: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-num_bytes:].decode(errors="replace")
        except OSError:
            return ""
