"""The Ray actor behind each instance and the router: one `kvserve` command as its child process.

The actor class is plain Python (the launcher wraps it with `ray.remote`), so this module imports
without Ray.  The command is the ordinary CLI (`python -m kvserve.entrypoints.cli serve|router ...`),
so an instance under Ray behaves exactly like one started by hand, drain on SIGTERM included.

The child is a `kvserve.launch.process.CliProcess`.  Pinning: the child is started with its CPU
affinity set to the actor's share of the node's cores (os.sched_setaffinity in the child before
exec, inherited by the engine process it spawns) and OMP_NUM_THREADS = that many cores, which sets
torch's intra-op threads.  Lifetime: the child gets PR_SET_PDEATHSIG(SIGKILL), so an actor that
dies (ray.kill, a crashed worker) takes its server with it; the server's engine process exits on
its own when its parent is gone (EOF on its pipe).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from kvserve.launch.process import CliProcess, free_port, wait_healthy

__all__ = ["ProcessActor", "free_port"]


class ProcessActor:
    """Runs `kvserve ARGV...` and reports on it; every method returns plain data."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.child: Optional[CliProcess] = None
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
        (or TimeoutError) with the log's tail if it exits or does not become healthy within `timeout_s`."""
        if self.child is not None:
            raise RuntimeError(f"{self.name} is already started")
        self.child = CliProcess(argv, self.log_path, host=host, port=port, env=env, cores=cores,
                                die_with_parent=True)
        try:
            wait_healthy([self.child], timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{self.name}: {exc}") from None
        return {"url": self.child.url, "pid": self.child.pid, "cores": self.child.cores, "log": str(self.log_path)}

    def poll(self) -> Optional[int]:
        """The child's exit status, or None while it runs."""
        return self.child.poll() if self.child is not None else None

    def stop(self, timeout_s: float = 30.0) -> Optional[int]:
        """SIGTERM (the server drains), then SIGKILL after `timeout_s`; returns the exit status."""
        return self.child.stop(timeout_s) if self.child is not None else None

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.child.log_tail(num_chars) if self.child is not None else ""
