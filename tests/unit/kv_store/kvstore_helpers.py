"""Helpers for kv_store tests (imported by conftest.py and the test modules)."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from kvserve.kv_store import KVNamespace

# Small enough that tier tests are instant: 2*2*4*2*8 = 256 values.
SMALL = dict(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)


def make_ns(dtype: torch.dtype = torch.float32, model_id: str | None = None, **over: int) -> KVNamespace:
    dims = {**SMALL, **over}
    return KVNamespace.create(model_id or f"test-{uuid.uuid4().hex[:8]}", dtype, **dims)


def make_block(ns: KVNamespace, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ns.block_shape, generator=g).to(ns.torch_dtype)


def key(i: int | str) -> bytes:
    return hashlib.sha256(f"block-{i}".encode()).digest()


@pytest.fixture
def ns() -> KVNamespace:
    return make_ns()


# ---------------------------------------------------------------- Redis

def redis_url_or_skip() -> str:
    import redis

    url = os.environ.get("KVSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.3, socket_timeout=0.5)
        client.ping()
        client.close()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no Redis server reachable at {url} ({e}); run scripts/start_redis.sh "
                    "or set KVSERVE_TEST_REDIS_URL")
    return url


@pytest.fixture
def redis_url() -> str:
    return redis_url_or_skip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A private redis-server on a fixed port that tests can stop and restart."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[Callable[[], RedisProcess]]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not installed (scripts/start_redis.sh installs it)")
    procs: list[RedisProcess] = []

    def make() -> RedisProcess:
        p = RedisProcess(free_port(), tmp_path)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()
