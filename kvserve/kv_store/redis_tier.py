"""`redis://HOST:PORT/DB`: a Redis server as a shared KV tier (redis-py).

Keys:   b"kvserve:" + hex(namespace digest)[:16] + b":" + hex(storage key)
        (the prefix lets an operator SCAN or delete one model's entries).
Values: the same container as disk files (file_format.py), checksummed and
        checked against namespace/codec/key on every read.

Size bound: Redis bounds itself; run it with `maxmemory` and
`maxmemory-policy allkeys-lru` (scripts/start_redis.sh does).  An optional
`ttl` (seconds) expires entries too.

Failure contract: any Redis error is logged, counted in stats.errors and
turned into a miss / a dropped put; it never reaches the engine.  After a
connection failure the tier is *down* for a back-off interval (doubling from
`backoff_initial_s` to `backoff_max_s`), during which calls return at once
without touching the network; the first call after the interval tries
again, and success resets the back-off.  One warning per outage, one info
line on recovery, so a dead Redis does not flood the log.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry

from kvserve.core.hashing import BlockHash
from kvserve.kv_store.base import KVBlock, KVTier
from kvserve.kv_store.codecs.base import Codec, CodecError
from kvserve.kv_store.entry import EntrySerializer
from kvserve.kv_store.file_format import CorruptEntry
from kvserve.kv_store.namespace import KVNamespace

logger = logging.getLogger(__name__)

T = TypeVar("T")
_BATCH = 64   # keys per MGET / pipeline, bounds a single reply's size
_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class _Unavailable:
    """Marker result: the call did not happen or failed."""


_UNAVAILABLE = _Unavailable()


class RedisTier(KVTier):
    scheme = "redis"
    persistent = True

    def __init__(
        self,
        namespace: KVNamespace,
        codec: Codec,
        url: str,
        *,
        ttl_s: float | None = None,
        socket_timeout_s: float = 2.0,
        connect_timeout_s: float = 0.5,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        super().__init__(namespace, codec)
        self.url = url
        self._ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self._serializer = EntrySerializer(self.namespace, codec)
        self._prefix = b"kvserve:" + self.namespace.digest()[:8].hex().encode() + b":"
        # No client-side retries: a failure should cost one round trip, after
        # which our own back-off takes over.  Connecting is lazy (first command).
        self._client = redis.Redis(
            **parse_url(url),  # type: ignore[no-untyped-call]
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._backoff = backoff_initial_s
        self._down_until = 0.0
        self._down_since: float | None = None

    def describe(self) -> str:
        return f"redis({self.url}, codec={self.codec.identity})"

    @property
    def key_prefix(self) -> bytes:
        return self._prefix

    def redis_key(self, block_hash: BlockHash) -> bytes:
        return self._prefix + self.namespace.storage_key(block_hash).hex().encode()

    @property
    def available(self) -> bool:
        """False while backing off after a connection failure."""
        return time.monotonic() >= self._down_until

    # ----- failure handling -------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T | _Unavailable:
        if not self.available:
            return _UNAVAILABLE
        try:
            result = fn()
        except _CONNECTION_ERRORS as e:
            self._mark_down(what, e)
            return _UNAVAILABLE
        except redis.exceptions.RedisError as e:   # e.g. OOM under maxmemory-policy noeviction
            logger.warning("redis tier %s: %s failed: %s", self.url, what, e)
            self._stats.errors += 1
            return _UNAVAILABLE
        if self._down_since is not None:
            logger.info("redis tier %s: reachable again after %.1fs", self.url,
                        time.monotonic() - self._down_since)
            self._down_since = None
        self._backoff = self._backoff_initial
        return result

    def _mark_down(self, what: str, e: BaseException) -> None:
        now = time.monotonic()
        self._stats.errors += 1
        if self._down_since is None:
            self._down_since = now
            logger.warning("redis tier %s unreachable (%s: %s); gets miss and puts are dropped, "
                           "retrying in %.1fs", self.url, what, e, self._backoff)
        else:
            logger.debug("redis tier %s still unreachable: %s", self.url, e)
        self._down_until = now + self._backoff
        self._backoff = min(self._backoff * 2, self._backoff_max)
        # Drop pooled sockets so the retry opens a fresh connection.
        try:
            self._client.connection_pool.disconnect()
        except Exception:  # noqa: BLE001 - cleanup must not raise
            pass

    # ----- hooks ------------------------------------------------------------

    def _contains(self, key: BlockHash) -> bool:
        return self._contains_many([key])[0]

    def _contains_many(self, keys: list[BlockHash]) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(keys), _BATCH):
            batch = keys[i:i + _BATCH]

            def run(batch: list[BlockHash] = batch) -> list[object]:
                pipe = self._client.pipeline(transaction=False)
                for k in batch:
                    pipe.exists(self.redis_key(k))
                return pipe.execute()

            res = self._call("EXISTS", run)
            out.extend([False] * len(batch) if isinstance(res, _Unavailable) else [bool(r) for r in res])
        return out

    def _get(self, key: BlockHash) -> KVBlock | None:
        return self._get_many([key])[0]

    def _get_many(self, keys: list[BlockHash]) -> list[KVBlock | None]:
        out: list[KVBlock | None] = []
        for i in range(0, len(keys), _BATCH):
            batch = keys[i:i + _BATCH]
            rkeys = [self.redis_key(k) for k in batch]

            def run(rkeys: list[bytes] = rkeys) -> list[bytes | None]:
                return list(self._client.mget(rkeys))  # type: ignore[arg-type]

            values = self._call("MGET", run)
            if isinstance(values, _Unavailable):
                out.extend([None] * len(batch))
                continue
            for k, rk, v in zip(batch, rkeys, values):
                out.append(None if v is None else self._unpack(k, rk, v))
        return out

    def _unpack(self, key: BlockHash, rkey: bytes, value: bytes) -> KVBlock | None:
        try:
            _, block = self._serializer.unpack(value, key)
        except CorruptEntry as e:
            logger.warning("redis tier: dropping bad entry %s: %s", rkey.decode(), e)
            self._stats.corrupt += 1
            self._call("DEL", lambda: self._client.delete(rkey))
            return None
        self._stats.bytes_read += len(value)
        return block

    def _put(self, key: BlockHash, block: KVBlock) -> None:
        self._put_many([(key, block)])

    def _put_many(self, items: list[tuple[BlockHash, KVBlock]]) -> None:
        if not self.available:   # don't pay for encoding what we would drop
            self._stats.dropped_puts += len(items)
            return
        for i in range(0, len(items), _BATCH):
            batch: list[tuple[bytes, bytes]] = []
            for k, block in items[i:i + _BATCH]:
                try:
                    header, payload = self._serializer.pack(k, block)
                except CodecError as e:
                    logger.warning("redis tier: dropping put, encode failed: %s", e)
                    self._stats.dropped_puts += 1
                    continue
                batch.append((self.redis_key(k), header + payload))

            def run(batch: list[tuple[bytes, bytes]] = batch) -> list[object]:
                pipe = self._client.pipeline(transaction=False)
                for rk, value in batch:
                    pipe.set(rk, value, px=self._ttl_ms)
                return pipe.execute()

            res = self._call("SET", run) if batch else []
            if isinstance(res, _Unavailable):
                self._stats.dropped_puts += len(batch)
            else:
                self._stats.bytes_written += sum(len(v) for _, v in batch)

    def _remove(self, key: BlockHash) -> None:
        rk = self.redis_key(key)
        self._call("DEL", lambda: self._client.delete(rk))

    def _clear(self) -> None:
        """Delete every key under this tier's namespace prefix."""
        def run() -> int:
            n = 0
            batch: list[bytes] = []
            for rk in self._client.scan_iter(match=self._prefix + b"*", count=500):
                batch.append(rk)
                if len(batch) >= 500:
                    n += self._client.delete(*batch)
                    batch = []
            if batch:
                n += self._client.delete(*batch)
            return n
        self._call("SCAN/DEL", run)

    def _close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 - closing must not raise
            pass
