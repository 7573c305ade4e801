"""LocalRayCluster's start-up helpers without starting Ray: finding the node ids a session's raylet
waits on (a head and a worker node, which leave different traces), writing the dashboard agent's
port file for each, and a retry that starts from a clean directory."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvserve.launch import cluster as cluster_mod
from kvserve.launch.cluster import LocalRayCluster, _session_node_ids

HEAD_ID = "ab" * 28
NODE_ID = "cd" * 28


def _raylet_log(session: Path, node_id: str, extra: str = "") -> None:
    logs = session / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "raylet.out").write_text(
        f"[2026-12-01 17:48:14,195 I 21610 21610] (raylet) main.cc:711: Setting node ID node_id={node_id}\n{extra}")


def test_node_ids_of_a_head_and_of_a_worker_session(tmp_path: Path) -> None:
    head = tmp_path / "head" / "session_2026-12-01_17-48-00_1"
    head.mkdir(parents=True)
    (head / f"gcs_server_port_{HEAD_ID}").write_text("6379")  # a head writes its GCS port first
    assert _session_node_ids(head) == {HEAD_ID}
    # A worker node writes no port file before its dashboard agent runs: only its raylet's log names it.
    worker = tmp_path / "node" / "session_2026-12-01_17-48-00_1"
    worker.mkdir(parents=True)
    assert _session_node_ids(worker) == set()
    _raylet_log(worker, NODE_ID)
    assert _session_node_ids(worker) == {NODE_ID}


def test_the_agent_port_file_is_written_for_a_worker_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_mod, "_ray_has_dashboard_extras", lambda: True)
    node = LocalRayCluster(1, log_dir=tmp_path, join="127.0.0.1:6379", token="t")
    try:
        session = node.temp_dir / "session_2026-12-01_17-48-00_1"
        session.mkdir()
        assert not node._persist_listen_port(4321)  # no node id known yet: nothing to write
        _raylet_log(session, NODE_ID)
        assert node._persist_listen_port(4321)
        assert (session / f"dashboard_agent_listen_port_{NODE_ID}").read_text() == "4321"
    finally:
        node.stop()


def test_a_worker_node_needs_the_cluster_token(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token"):
        LocalRayCluster(1, log_dir=tmp_path, join="127.0.0.1:6379")
    node = LocalRayCluster(1, log_dir=tmp_path, join="127.0.0.1:6379", token="t")
    try:
        assert node.address == "127.0.0.1:6379" and node.token == "t"
    finally:
        node.stop()


def test_a_retry_starts_in_a_clean_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker node's session is named after its cluster's, so a failed attempt's raylet log (with
    its fatal line) would be found again by the next attempt unless the directory is emptied."""
    node = LocalRayCluster(1, log_dir=tmp_path, join="127.0.0.1:6379", token="t")
    seen: list[list[str]] = []

    def start_once(self: LocalRayCluster, timeout_s: float) -> str:
        seen.append(sorted(p.name for p in self.temp_dir.iterdir()))
        fatal = self._raylet_fatal()
        if len(seen) == 1 or fatal:
            _raylet_log(self.temp_dir / "session_cluster", NODE_ID,
                        "[2026-12-01 17:45:33,379 C 19733 19733] (raylet) node_manager.cc:3588: Timed out\n")
            raise RuntimeError(f"`ray start` failed: {fatal or 'the first attempt'}")
        return self.address

    monkeypatch.setattr(LocalRayCluster, "_start_once", start_once)
    try:
        assert node.start(60, attempts=2) == "127.0.0.1:6379"
        assert seen == [[], []]
    finally:
        node.stop()
    assert not node.temp_dir.exists()
