"""Codec registry: `get_codec("raw" | "int8" | "fp8" | "cachegen[-b876][-a16][-zstd|-ans]")`."""
from __future__ import annotations

from typing import Callable

from kvserve.kv_store.codecs.base import Codec, CodecError

# name -> factory(full spec string).  The name is the spec up to the first "-".
_CODECS: dict[str, Callable[[str], Codec]] = {}


def register_codec(name: str, factory: Callable[[str], Codec]) -> None:
    _CODECS[name] = factory


def get_codec(spec: str) -> Codec:
    name = spec.split("-", 1)[0]
    try:
        factory = _CODECS[name]
    except KeyError:
        raise ValueError(f"unknown KV codec {spec!r}; known: {available_codecs()}") from None
    return factory(spec)


def available_codecs() -> list[str]:
    return sorted(_CODECS)


def _simple(cls: type[Codec]) -> Callable[[str], Codec]:
    def make(spec: str) -> Codec:
        if spec != cls.name:
            raise ValueError(f"codec {cls.name!r} takes no options, got {spec!r}")
        return cls()
    return make


def _register_builtins() -> None:
    from kvserve.kv_store.codecs.cachegen import CacheGenCodec
    from kvserve.kv_store.codecs.quant import Fp8Codec, Int8Codec
    from kvserve.kv_store.codecs.raw import RawCodec

    register_codec("raw", _simple(RawCodec))
    register_codec("int8", _simple(Int8Codec))
    register_codec("fp8", _simple(Fp8Codec))
    register_codec("cachegen", CacheGenCodec.from_spec)


_register_builtins()

__all__ = ["Codec", "CodecError", "get_codec", "register_codec", "available_codecs"]
