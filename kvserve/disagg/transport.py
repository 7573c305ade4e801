"""How exported KV blocks travel from a prefill instance to a decode instance.

One small interface, chosen by URL scheme (`transport_for_url`):

    shm://[DIR]               same host: one file per transfer in DIR (default /dev/shm/kvserve),
                              written by the prefill instance, read block-range by block-range by
                              the decode instance (tmpfs: a memcpy each way)
    ray://[ADDRESS][?codec=]  across hosts: Ray's object store (ray_transport.py; `ray` is an
                              optional dependency, imported only for this scheme)

Blocks are host tensors [n, num_layers, 2, block_size, num_kv_heads, head_dim] in the
pool's dtype (the KV tiers' block layout, worker/kv_transfer.py).

Life of a transfer (the invariants every transport keeps):
  * `publish` (producer) returns a plain-JSON locator; the copy lives until the consumer
    `release`s it or it expires (`expire`, called by the producer's engine every step), so
    nothing leaks when no decode instance ever comes;
  * `fetch` (consumer) reads only the blocks asked for - a decode instance skips those its
    prefix cache holds - and raises TransferError (never returns partial data) when the
    copy is gone, damaged or unreachable;
  * a locator names a one-shot copy: after `release` another fetch fails cleanly.
"""
from __future__ import annotations

import logging
import os
import threading
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar
from urllib.parse import parse_qs, urlsplit

import torch

logger = logging.getLogger(__name__)


class TransferError(Exception):
    """A transfer that cannot complete (gone, damaged, unreachable, timed out)."""


class KVTransport(ABC):
    scheme: ClassVar[str]

    @abstractmethod
    def publish(self, transfer_id: str, blocks: torch.Tensor, expires_at: float) -> dict[str, Any]:
        """Producer: keep `blocks` ([n, L, 2, bs, H, D], host) for a consumer; return the locator."""

    @abstractmethod
    def fetch(self, locator: dict[str, Any], first: int, num_blocks: int, dtype: torch.dtype,
              block_shape: tuple[int, ...], timeout_s: float) -> torch.Tensor:
        """Consumer: blocks [first, first + num_blocks) of a published transfer, [n, *block_shape]."""

    @abstractmethod
    def release(self, locator: dict[str, Any]) -> None:
        """Consumer: done with the transfer (the producer's copy may go)."""

    def expire(self, now: float) -> int:
        """Producer: drop copies past their deadline; returns how many."""
        return 0

    @property
    def num_exports(self) -> int:
        """Producer: copies held now."""
        return 0

    def close(self) -> None:
        """Producer: drop every copy still held."""


_REGISTRY: dict[str, Callable[[str], KVTransport]] = {}


def register_transport(scheme: str, factory: Callable[[str], KVTransport]) -> None:
    _REGISTRY[scheme] = factory


def transport_for_url(url: str) -> KVTransport:
    scheme = url.partition("://")[0]
    if scheme == "ray" and "ray" not in _REGISTRY:
        from kvserve.disagg import ray_transport  # noqa: F401 - registers "ray"
    factory = _REGISTRY.get(scheme)
    if factory is None:
        raise ValueError(f"unknown KV transport {url!r}; known: {sorted(set(_REGISTRY) | {'ray'})}")
    return factory(url)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


# Expiry rounds (the reaper's, every 0.5 s) between sweeps for files of dead producers.
_SWEEP_EVERY = 6


class ShmTransport(KVTransport):
    """Files on a tmpfs, one per transfer: `<dir>/<instance>-<transfer id>.kv`.

    The producer writes `*.tmp` and renames it, so a consumer never reads a half-written
    file; the consumer unlinks it on `release` (one-shot), the producer unlinks it when it
    expires.  Files are named by the producer's pid, so the other instances on the directory
    sweep what a killed one left behind (`_sweep_dead`, at start and every few expiry rounds).

    Fault injection for tests of transfer timeouts: `?fetch_delay_s=S` delays every fetch by S
    seconds; `?fetch_delay_file=PATH` by the number of seconds PATH holds, while it exists.
    """

    scheme = "shm"

    def __init__(self, url: str = "shm://") -> None:
        parts = urlsplit(url)
        path = (parts.netloc + parts.path) if (parts.netloc or parts.path) else ""
        if not path:
            base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
            path = str(base / "kvserve")
        self.dir = Path(path)  # created with the first export: an engine that never exports needs none
        query = parse_qs(parts.query)
        self.fetch_delay_s = float(query.get("fetch_delay_s", ["0"])[0])
        self.fetch_delay_file = query.get("fetch_delay_file", [None])[0]
        self.prefix = f"p{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._exports: dict[str, float] = {}  # path -> expires_at
        self._lock = threading.Lock()  # guards _exports: the engine thread publishes, a reaper expires
        self._rounds = 0
        self._sweep_dead()

    def _sweep_dead(self) -> None:
        if not self.dir.is_dir():
            return
        for f in self.dir.glob("p*-*.kv*"):
            try:
                pid = int(f.name[1:].split("-", 1)[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                f.unlink(missing_ok=True)

    def publish(self, transfer_id: str, blocks: torch.Tensor, expires_at: float) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{self.prefix}-{transfer_id}.kv"
        tmp = path.with_suffix(".kv.tmp")
        with open(tmp, "wb") as f:
            f.write(_tensor_bytes(blocks))
        os.replace(tmp, path)
        with self._lock:
            self._exports[str(path)] = expires_at
        n = blocks.shape[0]
        return {"path": str(path), "num_blocks": n, "block_nbytes": blocks[0].numel() * blocks.element_size()}

    def fetch(self, locator: dict[str, Any], first: int, num_blocks: int, dtype: torch.dtype,
              block_shape: tuple[int, ...], timeout_s: float) -> torch.Tensor:
        delay = self.fetch_delay_s
        if self.fetch_delay_file is not None:
            try:
                delay = float(Path(self.fetch_delay_file).read_text())
            except (OSError, ValueError):
                pass
        if delay:
            time.sleep(delay)
        path, total, nbytes = locator.get("path"), locator.get("num_blocks"), locator.get("block_nbytes")
        if not isinstance(path, str) or not isinstance(total, int) or not isinstance(nbytes, int):
            raise TransferError("malformed shm locator")
        elem = torch.empty((), dtype=dtype).element_size()
        expect = elem
        for d in block_shape:
            expect *= d
        if expect != nbytes:
            raise TransferError(f"the prefill instance's blocks are {nbytes} bytes, this pool's {expect}")
        if first < 0 or first + num_blocks > total:
            raise TransferError(f"blocks [{first}, {first + num_blocks}) asked of a {total}-block transfer")
        try:
            with open(path, "rb") as f:
                f.seek(first * nbytes)
                data = bytearray(f.read(num_blocks * nbytes))
        except FileNotFoundError:
            raise TransferError(f"the transfer is gone ({path}): expired, already used, or its prefill "
                                "instance's host was cleaned") from None
        except OSError as exc:
            raise TransferError(f"reading {path}: {exc}") from None
        if len(data) != num_blocks * nbytes:
            raise TransferError(f"{path} is truncated ({len(data)} of {num_blocks * nbytes} bytes)")
        if num_blocks == 0:
            return torch.empty((0, *block_shape), dtype=dtype)
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(num_blocks, *block_shape)

    def release(self, locator: dict[str, Any]) -> None:
        path = locator.get("path")
        if isinstance(path, str):
            Path(path).unlink(missing_ok=True)
        with self._lock:
            self._exports.pop(str(path), None)

    def expire(self, now: float) -> int:
        expired = 0
        self._rounds += 1
        if now and self._rounds % _SWEEP_EVERY == 0:
            self._sweep_dead()
        with self._lock:
            for p, t in list(self._exports.items()):
                if not os.path.exists(p):  # the consumer released it
                    del self._exports[p]
                elif t <= now:
                    Path(p).unlink(missing_ok=True)
                    del self._exports[p]
                    expired += 1
        return expired

    @property
    def num_exports(self) -> int:
        self.expire(0.0)  # forget copies their consumer released (expires none: deadlines are > 0)
        return len(self._exports)

    def close(self) -> None:
        with self._lock:
            for p in self._exports:
                Path(p).unlink(missing_ok=True)
            self._exports.clear()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


register_transport("shm", ShmTransport)
