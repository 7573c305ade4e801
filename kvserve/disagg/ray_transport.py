"""`ray://[ADDRESS][?codec=NAME&group=N]`: KV blocks through Ray's object store, across hosts.

The producer (prefill engine) puts each group of N blocks (default 1) as one object, encoded
with a KV-tier codec (kvserve/kv_store/codecs: raw, int8, fp8, cachegen; default raw), and
hands the object refs to a small mailbox actor it owns (one per producer, named
`kvserve-kv-<instance>`, placed on the producer's node).  The locator names the mailbox and the
transfer.  The consumer asks the mailbox for the refs of the groups it needs (not those its
prefix cache holds), then `ray.get`s them, so only those cross the network, straight from the
producer node's object store.  `release` drops the mailbox's refs; the mailbox also drops
transfers past their deadline, so the objects are freed either way (Ray's reference counting:
the producer keeps no ref of its own after handing them over).

If the producer dies, its objects and its mailbox die with it (Ray's ownership): a fetch then
raises TransferError, and the decode request fails cleanly.

ADDRESS: empty or "auto" joins the running cluster (`ray start --head`, RAY_ADDRESS); "local"
starts a private one in this process (tests, a single process); otherwise HOST:PORT.  A process
that already called `ray.init` keeps its connection.  `ray` is imported only here.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

import torch

from kvserve.disagg.transport import KVTransport, TransferError, register_transport

logger = logging.getLogger(__name__)

NAMESPACE = "kvserve"


def _ray() -> Any:
    try:
        import ray
    except ImportError:  # pragma: no cover - depends on the environment
        raise ValueError("the ray:// KV transport needs Ray: pip install ray") from None
    return ray


def connect(address: str) -> Any:
    ray = _ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(namespace=NAMESPACE, ignore_reinit_error=True, include_dashboard=False,
                                      log_to_driver=False)
        if address == "local":  # a new private cluster, even when another one runs on this host
            ray.init(address="local", num_cpus=1, **kwargs)
        else:
            ray.init(address=address or "auto", **kwargs)
    return ray


class _Mailbox:
    """Holds a producer's object refs per transfer until released or expired (a Ray actor)."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[list[Any], float]] = {}

    def put(self, transfer_id: str, refs: list[list[Any]], expires_at: float) -> None:
        self.items[transfer_id] = (refs[0], expires_at)  # refs arrive wrapped, so they stay refs

    def refs(self, transfer_id: str, first: int, num: int) -> Optional[list[list[Any]]]:
        item = self.items.get(transfer_id)
        return None if item is None else [item[0][first:first + num]]

    def release(self, transfer_id: str) -> None:
        self.items.pop(transfer_id, None)

    def expire(self, now: float) -> tuple[int, int]:
        """(transfers dropped, transfers still held)."""
        gone = [t for t, (_, exp) in self.items.items() if exp <= now]
        for t in gone:
            del self.items[t]
        return len(gone), len(self.items)


class RayTransport(KVTransport):
    scheme = "ray"

    def __init__(self, url: str = "ray://") -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        from kvserve.kv_store.codecs import get_codec

        self.codec = get_codec(query.get("codec", ["raw"])[0])
        self.group = max(1, int(query.get("group", ["1"])[0]))
        self.ray = connect(parts.netloc + parts.path)
        self.name = f"kvserve-kv-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._mailbox: Any = None  # created with the first export (a decode-only instance needs none)
        self._held = 0

    def _own_mailbox(self) -> Any:
        if self._mailbox is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            node = self.ray.get_runtime_context().get_node_id()
            actor = self.ray.remote(num_cpus=0)(_Mailbox)
            self._mailbox = actor.options(  # type: ignore[attr-defined]
                name=self.name, namespace=NAMESPACE,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        return self._mailbox

    def publish(self, transfer_id: str, blocks: torch.Tensor, expires_at: float) -> dict[str, Any]:
        mailbox = self._own_mailbox()
        n = blocks.shape[0]
        refs = [self.ray.put([self.codec.encode(b) for b in blocks[i:i + self.group]]) for i in range(0, n, self.group)]
        self.ray.get(mailbox.put.remote(transfer_id, [refs], expires_at))  # held there before ours go
        self._held += 1
        return {"actor": self.name, "namespace": NAMESPACE, "transfer_id": transfer_id, "num_blocks": n,
                "group": self.group,
                "codec": self.codec.identity, "codec_spec": self.codec.name}

    def fetch(self, locator: dict[str, Any], first: int, num_blocks: int, dtype: torch.dtype,
              block_shape: tuple[int, ...], timeout_s: float) -> torch.Tensor:
        from kvserve.kv_store.codecs import get_codec

        deadline = time.monotonic() + timeout_s
        try:
            group, total = int(locator["group"]), int(locator["num_blocks"])
            codec = get_codec(str(locator["codec_spec"]))
            if codec.identity != locator["codec"]:
                raise TransferError(f"codec {locator['codec']} is not this build's {codec.identity}")
            if first < 0 or first + num_blocks > total:
                raise TransferError(f"blocks [{first}, {first + num_blocks}) asked of a {total}-block transfer")
            mailbox = self.ray.get_actor(locator["actor"], namespace=locator.get("namespace", NAMESPACE))
            g0, g1 = first // group, -(-(first + num_blocks) // group)
            holder = self.ray.get(mailbox.refs.remote(self._tid(locator), g0, g1 - g0),
                                  timeout=max(0.01, deadline - time.monotonic()))
            if holder is None:
                raise TransferError("the transfer is gone (expired or already used)")
            groups = self.ray.get(holder[0], timeout=max(0.01, deadline - time.monotonic()))
        except TransferError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray's errors (owner died, timeout, actor gone)
            raise TransferError(f"Ray: {type(exc).__name__}: {exc}") from None
        blobs = [b for g in groups for b in g][first - g0 * group:][:num_blocks]
        if len(blobs) != num_blocks:
            raise TransferError(f"{len(blobs)} of {num_blocks} blocks arrived")
        try:
            out = [codec.decode(b, dtype, block_shape) for b in blobs]
        except Exception as exc:  # noqa: BLE001 - a damaged payload
            raise TransferError(f"decoding a block failed: {exc}") from None
        return torch.stack(out) if out else torch.empty((0, *block_shape), dtype=dtype)

    @staticmethod
    def _tid(locator: dict[str, Any]) -> str:
        tid = locator.get("transfer_id")
        if not isinstance(tid, str):
            raise TransferError("malformed ray locator (no transfer_id)")
        return tid

    def release(self, locator: dict[str, Any]) -> None:
        try:
            mailbox = self.ray.get_actor(locator["actor"], namespace=locator.get("namespace", NAMESPACE))
            mailbox.release.remote(self._tid(locator))
        except Exception:  # noqa: BLE001 - the producer (and its objects) may be gone already
            logger.debug("releasing a Ray transfer failed", exc_info=True)

    def expire(self, now: float) -> int:
        if self._mailbox is None:
            return 0
        try:
            expired, self._held = self.ray.get(self._mailbox.expire.remote(now), timeout=10)
            return int(expired)
        except Exception:  # noqa: BLE001
            logger.exception("expiring Ray KV exports failed")
            return 0

    @property
    def num_exports(self) -> int:
        """As of the last expiry round (the reaper's, every 0.5 s; no actor call here)."""
        return self._held

    def close(self) -> None:
        if self._mailbox is not None:
            try:
                self.ray.kill(self._mailbox)
            except Exception:  # noqa: BLE001
                logger.debug("killing the KV mailbox failed", exc_info=True)
            self._mailbox = None


register_transport("ray", RayTransport)
