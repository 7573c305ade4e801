"""The transports on their own: a block range round trip, one-shot release, expiry, clear errors."""
from __future__ import annotations

import os
import time

import pytest
import torch

from kvserve.disagg.transport import ShmTransport, TransferError, transport_for_url

SHAPE = (2, 2, 4, 2, 8)  # [layers, K/V, block_size, kv heads, head_dim]


def blocks(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn((n, *SHAPE)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shm_round_trip_of_a_block_range(tmp_path, dtype):
    t = transport_for_url(f"shm://{tmp_path}")
    assert isinstance(t, ShmTransport)
    b = blocks(5, dtype)
    loc = t.publish("x", b, time.time() + 60)
    got = t.fetch(loc, 2, 3, dtype, SHAPE, 1.0)
    assert torch.equal(got, b[2:]) and got.dtype == dtype
    assert t.num_exports == 1
    t.release(loc)
    assert t.num_exports == 0 and os.listdir(tmp_path) == []
    with pytest.raises(TransferError, match="gone"):
        t.fetch(loc, 0, 1, dtype, SHAPE, 1.0)


def test_shm_refuses_a_wrong_layout_and_range(tmp_path):
    t = ShmTransport(f"shm://{tmp_path}")
    loc = t.publish("x", blocks(2), time.time() + 60)
    with pytest.raises(TransferError, match="bytes"):
        t.fetch(loc, 0, 1, torch.float32, (2, 2, 4, 2, 4), 1.0)
    with pytest.raises(TransferError, match="asked of a 2-block"):
        t.fetch(loc, 1, 2, torch.float32, SHAPE, 1.0)
    with open(loc["path"], "r+b") as f:
        f.truncate(10)
    with pytest.raises(TransferError, match="truncated"):
        t.fetch(loc, 0, 1, torch.float32, SHAPE, 1.0)


def test_shm_expiry_and_sweep_of_dead_producers(tmp_path):
    t = ShmTransport(f"shm://{tmp_path}")
    t.publish("old", blocks(1), time.time() - 1)
    t.publish("new", blocks(1), time.time() + 60)
    assert t.expire(time.time()) == 1 and t.num_exports == 1
    # A file of a producer that no longer runs (pid 2**22 + 1 is beyond pid_max's default).
    (tmp_path / "p4194305-deadbeef-t.kv").write_bytes(b"x")
    ShmTransport(f"shm://{tmp_path}")
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(p) for p in t._exports]
    (tmp_path / "p4194305-deadbeef-u.kv").write_bytes(b"x")  # left while both run: swept by the reaper rounds
    for _ in range(6):
        t.expire(time.time())
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(p) for p in t._exports]
    t.close()
    assert os.listdir(tmp_path) == []


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown KV transport"):
        transport_for_url("tcp://x")


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (an optional dependency of the ray:// transport only)")
    from kvserve.launch.cluster import LocalRayCluster, use_cluster_token  # patient on a loaded machine

    cluster = LocalRayCluster(1, log_dir=tmp_path_factory.mktemp("ray"))
    env = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    # Also when Ray was loaded earlier in this process (collecting the launcher's tests imports it).
    use_cluster_token(cluster.token)
    import ray

    try:
        address = cluster.start()
        ray.init(address=address, include_dashboard=False, log_to_driver=False, namespace="kvserve")
        yield address
    finally:
        ray.shutdown()
        cluster.stop()
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("codec", ["raw", "int8"])
def test_ray_round_trip_fetches_only_the_asked_groups(ray_local, codec):
    t = transport_for_url(f"ray://{ray_local}?codec={codec}&group=2")
    b = blocks(5)
    loc = t.publish("r1", b, time.time() + 60)
    got = t.fetch(loc, 3, 2, torch.float32, SHAPE, 30.0)
    if codec == "raw":
        assert torch.equal(got, b[3:])
    else:  # lossy: close, not equal
        assert torch.allclose(got, b[3:], atol=0.05 * float(b.abs().max()))
    t.release(loc)
    with pytest.raises(TransferError, match="gone"):
        t.fetch(loc, 0, 1, torch.float32, SHAPE, 30.0)
    t.publish("r2", b, time.time() - 1)
    assert t.expire(time.time()) == 1 and t.num_exports == 0
    t.close()
