"""Build tiers and tier hierarchies from spec strings.

    cpu:SIZE[:codec=NAME]                       host memory, LRU, bounded
    disk:PATH:SIZE[:codec=NAME]                 directory, LRU, bounded, survives restarts
    redis://HOST:PORT/DB[?codec=NAME&ttl=S][:codec=NAME]
                                                Redis (also rediss://); bounded by the server

SIZE: bytes (1000000), or with a unit: KiB/MiB/GiB/TiB (powers of 1024),
KB/MB/GB/TB (powers of 1000), K/M/G/T (taken as powers of 1024).
A comma-separated list is a hierarchy, fastest first:
    "cpu:4GiB,disk:/var/cache/kvserve:20GiB,redis://127.0.0.1:6379/0"

Options (`:key=value` suffixes; for Redis also URL query parameters):
    codec=NAME      this tier's codec (default: the store-wide codec, e.g. --kv-codec)
    ttl=SECONDS     redis only: expire entries
    timeout=SECONDS redis only: socket timeout

New schemes plug in with `register_tier(scheme, factory)`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kvserve.kv_store.base import KVTier
from kvserve.kv_store.codecs import get_codec
from kvserve.kv_store.codecs.base import Codec
from kvserve.kv_store.cpu_tier import CpuTier
from kvserve.kv_store.disk_tier import DiskTier
from kvserve.kv_store.namespace import KVNamespace
from kvserve.kv_store.tiered import TieredKVStore, WritePolicy
from kvserve.utils.sizes import parse_size  # re-exported: tier specs take the same sizes as flags

_OPTION_RE = re.compile(r"^([a-z_]+)=(.*)$")


@dataclass(frozen=True)
class TierSpec:
    scheme: str
    location: str                      # disk: path; redis: URL; cpu: ""
    size: int | None                   # bytes; None for redis
    options: dict[str, str] = field(default_factory=dict)


def parse_tier_spec(text: str) -> TierSpec:
    text = text.strip()
    if not text:
        raise ValueError("empty KV tier spec")
    # Trailing ":key=value" options (a path or URL segment never matches "word=").
    parts = text.split(":")
    options: dict[str, str] = {}
    while len(parts) > 1 and (m := _OPTION_RE.match(parts[-1])):
        options.setdefault(m.group(1), m.group(2))
        parts.pop()
    body = ":".join(parts)
    if "://" in body:
        scheme = body.split("://", 1)[0].lower()
        if scheme not in ("redis", "rediss", "unix"):
            return TierSpec(scheme, body, None, options)
        url = urlsplit(body)
        keep: list[tuple[str, str]] = []
        for k, v in parse_qsl(url.query):
            if k in ("codec", "ttl", "timeout"):
                options.setdefault(k, v)
            else:
                keep.append((k, v))  # left for redis-py (e.g. password=...)
        location = urlunsplit(url._replace(query=urlencode(keep)))
        return TierSpec(scheme, location, None, options)
    scheme, _, rest = body.partition(":")
    scheme = scheme.lower()
    if scheme == "cpu":
        if not rest:
            raise ValueError(f"{text!r}: expected cpu:SIZE")
        return TierSpec("cpu", "", parse_size(rest), options)
    if scheme == "disk":
        path, _, size = rest.rpartition(":")
        if not path or not size:
            raise ValueError(f"{text!r}: expected disk:PATH:SIZE")
        return TierSpec("disk", path, parse_size(size), options)
    return TierSpec(scheme, rest, None, options)


TierFactory = Callable[[TierSpec, KVNamespace, Codec], KVTier]
_FACTORIES: dict[str, TierFactory] = {}
_ALLOWED_OPTIONS: dict[str, set[str]] = {}


def register_tier(scheme: str, factory: TierFactory, options: set[str] | frozenset[str] = frozenset()) -> None:
    _FACTORIES[scheme] = factory
    _ALLOWED_OPTIONS[scheme] = {"codec", *options}


def _make_cpu(spec: TierSpec, ns: KVNamespace, codec: Codec) -> KVTier:
    assert spec.size is not None
    return CpuTier(ns, codec, spec.size)


def _make_disk(spec: TierSpec, ns: KVNamespace, codec: Codec) -> KVTier:
    assert spec.size is not None
    return DiskTier(ns, codec, spec.location, spec.size)


def _make_redis(spec: TierSpec, ns: KVNamespace, codec: Codec) -> KVTier:
    from kvserve.kv_store.redis_tier import RedisTier  # redis-py only when used

    ttl = spec.options.get("ttl")
    timeout = spec.options.get("timeout")
    kwargs: dict[str, float] = {}
    if timeout is not None:
        kwargs["socket_timeout_s"] = float(timeout)
    return RedisTier(ns, codec, spec.location, ttl_s=None if ttl is None else float(ttl), **kwargs)


register_tier("cpu", _make_cpu)
register_tier("disk", _make_disk)
register_tier("redis", _make_redis, {"ttl", "timeout"})
register_tier("rediss", _make_redis, {"ttl", "timeout"})
register_tier("unix", _make_redis, {"ttl", "timeout"})


def create_tier(spec: str | TierSpec, namespace: KVNamespace, default_codec: str = "raw") -> KVTier:
    ts = parse_tier_spec(spec) if isinstance(spec, str) else spec
    factory = _FACTORIES.get(ts.scheme)
    if factory is None:
        raise ValueError(f"unknown KV tier scheme {ts.scheme!r}; known: {sorted(_FACTORIES)}")
    unknown = set(ts.options) - _ALLOWED_OPTIONS[ts.scheme]
    if unknown:
        raise ValueError(f"KV tier {ts.scheme!r}: unknown option(s) {sorted(unknown)}; "
                         f"allowed: {sorted(_ALLOWED_OPTIONS[ts.scheme])}")
    codec = get_codec(ts.options.get("codec", default_codec))
    return factory(ts, namespace, codec)


def build_kv_store(
    spec: str,
    namespace: KVNamespace,
    *,
    codec: str = "raw",
    write_policy: WritePolicy | str = WritePolicy.WRITE_THROUGH,
    promote: bool = True,
) -> TieredKVStore:
    """Build the hierarchy for a comma-separated spec (e.g. the --kv-tiers flag).

    `codec` is the default for tiers without a `codec=` option.  On a bad spec
    raises ValueError before any tier is created (so no half-built store).
    """
    items = [s for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError("empty KV store spec")
    parsed = [parse_tier_spec(s) for s in items]
    for ts in parsed:   # validate everything first
        if ts.scheme not in _FACTORIES:
            raise ValueError(f"unknown KV tier scheme {ts.scheme!r}; known: {sorted(_FACTORIES)}")
        get_codec(ts.options.get("codec", codec))
    tiers: list[KVTier] = []
    try:
        for ts in parsed:
            tiers.append(create_tier(ts, namespace, codec))
    except BaseException:
        for t in tiers:
            t.close()
        raise
    return TieredKVStore(tiers, write_policy=write_policy, promote=promote)
