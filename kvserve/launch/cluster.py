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
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from kvserve.launch.process import free_port

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


def _ray_has_dashboard_extras() -> bool:
    """Whether Ray's dashboard agent runs in full (ray[default]) rather than minimal mode."""
    from ray._private.utils import get_dashboard_dependency_error

    return get_dashboard_dependency_error() is None


def use_cluster_token(token: str) -> None:
    """Make this process authenticate to Ray with `token` (a `LocalRayCluster`'s).

    Ray reads RAY_AUTH_MODE/RAY_AUTH_TOKEN into a per-process cache the first time it needs them;
    when Ray was already imported and used here (a test process that collected other Ray tests),
    the environment alone is not re-read and the driver is refused with InvalidAuthToken.  So the
    cache and Ray's config are refreshed too, the way Ray's own test helpers do.
    """
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    if "ray" not in sys.modules:
        return  # Ray will read the environment when it first loads
    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]
    except ImportError:  # a Ray without token authentication: nothing is cached
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


_RAYLET_NODE_ID = re.compile(rb"Setting node ID node_id=([0-9a-f]+)")


def _session_node_ids(session: Path) -> set[str]:
    """The ids of the nodes started in `session`: from the port files Ray writes there (a head
    writes its GCS port before its raylet starts), else from the raylet's first log lines (a
    worker node writes no port file before its agent runs)."""
    ids = {f.name.rsplit("_", 1)[1] for f in session.glob("*_port_*") if "." not in f.name}
    try:
        with open(session / "logs" / "raylet.out", "rb") as log:
            ids.update(m.decode() for m in _RAYLET_NODE_ID.findall(log.read(65536)))
    except OSError:
        pass
    return ids


class LocalRayCluster:
    """`ray start --head --block` on this machine with `num_cpus` CPUs; `stop()` ends it.

    With `join=HEAD_ADDRESS` (and that cluster's `token`) it is instead a worker node of that
    cluster: `ray start --address HEAD_ADDRESS --block`, in its own temp directory, so several
    nodes can run on one machine (tests of `--ray-address`); `stop()` ends only this node."""

    def __init__(self, num_cpus: float, host: str = "127.0.0.1", log_dir: Optional[Path] = None,
                 join: Optional[str] = None, token: Optional[str] = None) -> None:
        self.num_cpus = num_cpus
        self.host = host
        self.join = join
        self.port = free_port(host)  # the head's GCS port (unused by a worker node)
        # Ray authenticates its clients by token; this cluster gets its own (not ~/.ray/auth_token,
        # which other clusters on the machine may rewrite).  Drivers join with it in RAY_AUTH_TOKEN.
        if join is not None and token is None:
            raise ValueError("a worker node needs its cluster's token")
        self.token = token or secrets.token_hex(32)
        self.proc: Optional[subprocess.Popen[bytes]] = None
        # Ray's own files (sessions, sockets) in a directory of this node only: short, since
        # Ray puts Unix sockets in it, and removed at stop.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="kvray-", dir="/tmp"))
        kind = "head" if join is None else "node"
        self.log_path = (log_dir or Path("/tmp")) / f"kvserve-ray-{kind}-{os.getpid()}-{self.temp_dir.name}.log"

    @property
    def pid(self) -> Optional[int]:
        """The `ray start` process (its children are the node's processes)."""
        return self.proc.pid if self.proc is not None else None

    @property
    def address(self) -> str:
        """The cluster's address (a worker node's: the head it joined)."""
        return self.join if self.join is not None else f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 300.0, attempts: int = 3) -> str:
        """Start the head and return its address.  Ray 2.x gives its dashboard agent a fixed
        15 s to report its port; on a heavily loaded machine the agent's imports take longer and
        the raylet aborts, so a failed start is retried (the next one finds warm caches)."""
        deadline = time.monotonic() + timeout_s
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(max(1.0, deadline - time.monotonic()))
            except RuntimeError as exc:
                if attempt == attempts or time.monotonic() >= deadline:
                    raise
                logger.warning("the local Ray cluster did not start (attempt %d of %d), retrying: %s", attempt,
                               attempts, str(exc).splitlines()[0])
                self.port = free_port(self.host)
                # A fresh directory: a worker node's session is named after its cluster's, so a
                # retry would otherwise find the failed attempt's raylet log and its fatal line.
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                self.temp_dir.mkdir(parents=True, exist_ok=True)
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> str:
        ports = [free_port(self.host) for _ in range(4)]
        where = (["--head", "--port", str(self.port), "--include-dashboard=false"] if self.join is None
                 else ["--address", self.join])  # --port and --include-dashboard are head-only flags
        cmd = [ray_executable(), "start", *where, "--block",
               "--node-ip-address", self.host, "--num-cpus", f"{self.num_cpus:g}", "--num-gpus", "0",
               "--disable-usage-stats", "--temp-dir", str(self.temp_dir),
               "--dashboard-agent-grpc-port", str(ports[0]), "--dashboard-agent-listen-port", str(ports[1]),
               "--metrics-export-port", str(ports[2]), "--runtime-env-agent-port", str(ports[3])]
        # A slow (loaded) machine starts Ray's agents slowly; the raylet must not give up on them.
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        for name, value in _PATIENT_RAY.items():
            env.setdefault(name, value)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # Ctrl-C goes to us, not to Ray
        deadline = time.monotonic() + timeout_s
        marker = b"block forever"
        listen_port_written = False
        while True:
            if not listen_port_written:
                listen_port_written = self._persist_listen_port(ports[1])
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {self.proc.returncode}:\n{self.log_tail()}")
            text = self.log_path.read_bytes()
            if marker in text:
                return self.address
            fatal = self._raylet_fatal()
            if fatal or b"timed out during startup" in text or b"Traceback" in text:
                self.stop(timeout_s=5.0)  # the raylet aborted; `ray start` would wait on its dead node
                raise RuntimeError(f"`ray start` failed: {fatal or self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the local Ray cluster did not start within {timeout_s:g} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def _persist_listen_port(self, port: int) -> bool:
        """Work around a fixed 15 s wait in Ray 2.x's raylet: it is not given the dashboard agent's
        listen port (`ray start` passes --dashboard-agent-listen-port to the agent only) and waits
        for the agent to write it to `<session>/dashboard_agent_listen_port_<node id>`; on a loaded
        machine the agent's start-up takes longer and the raylet aborts.  The value is known here:
        the port chosen above, or -1 when Ray lacks its dashboard extras (the minimal agent
        serves no HTTP and writes -1).  Writing it first (atomically, only if absent) lets the
        raylet go on; the agent writes the same value later.  True once written or present."""
        sessions = list(self.temp_dir.glob("session_2*"))
        if not sessions:
            return False
        for session in sessions:
            node_ids = _session_node_ids(session)
            for node_id in node_ids:
                target = session / f"dashboard_agent_listen_port_{node_id}"
                if target.exists():
                    continue
                tmp = target.with_name(target.name + ".kvserve-tmp")
                tmp.write_text(str(port if _ray_has_dashboard_extras() else -1))
                try:
                    os.link(tmp, target)  # fails if the agent wrote it meanwhile: keep the agent's
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink(missing_ok=True)
            if node_ids:
                return True
        return False

    def _raylet_fatal(self) -> Optional[str]:
        """The raylet's fatal log line, if it aborted (Ray logs those with level C)."""
        for log in self.temp_dir.glob("session_*/logs/raylet.out"):
            try:
                for line in log.read_text(errors="replace").splitlines():
                    if " C " in line and "(raylet)" in line:
                        return line[:400]
            except OSError:
                pass
        return None

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop_head(timeout_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _stop_head(self, timeout_s: float) -> None:
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
