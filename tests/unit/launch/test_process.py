"""kvserve.launch.process: a kvserve CLI child and the wait for its /health, shared by the launcher's
actors, the benchmarks and the e2e harness.  Only the failure paths here (the e2e tests and the
launch tests start real servers through it)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvserve.launch.process import CliProcess, wait_healthy


def test_a_child_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    proc = CliProcess(["serve", str(tmp_path / "no-such-model")], tmp_path / "serve.log")
    with pytest.raises(RuntimeError, match="exited with 2") as err:
        wait_healthy([proc], timeout_s=300)
    assert "no-such-model" in str(err.value)  # the server's own error, from its log
    assert proc.poll() == 2


def test_a_late_child_is_stopped_with_the_others(tmp_path: Path) -> None:
    slow = CliProcess(["router", "--instance", "http://127.0.0.1:9"], tmp_path / "router.log")
    other = CliProcess(["router", "--instance", "http://127.0.0.1:9"], tmp_path / "router2.log")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="not healthy after"):
        wait_healthy([slow, other], timeout_s=0.01)  # no Python process binds its port that fast
    assert time.monotonic() - started < 60
    assert slow.poll() is not None and other.poll() is not None  # both stopped, none left behind


def test_pinning_and_environment(tmp_path: Path) -> None:
    core = sorted(os.sched_getaffinity(0))[0]
    proc = CliProcess(["router", "--instance", "http://127.0.0.1:9"], tmp_path / "router.log", cores=[core],
                      env={"KVSERVE_TEST_MARK": "1"})
    try:
        assert os.sched_getaffinity(proc.pid) == {core}
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert b"OMP_NUM_THREADS=1" in environ and b"KVSERVE_TEST_MARK=1" in environ
        assert proc.url == f"http://127.0.0.1:{proc.port}"
    finally:
        assert proc.stop(30) is not None
