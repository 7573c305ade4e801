"""Entropy coders for the cachegen codec's int8 symbol streams.

A coder turns a list of int8 streams (one per statistical group: layer, K/V,
head, anchor-or-delta) into bytes and back; the decoder is told each stream's
length, so no framing is stored.  Coders:

  ans     constriction's ANS coder (Bamler 2022) with one two-sided geometric
          (discrete Laplace) model per stream, the model parameter stored as
          a u16.  The probability table is built with multiplications only, so
          encoder and decoder on different machines build the same table.
  zstd    zstandard on the concatenated streams (LZ + Huffman/FSE, order 0).
  lz4     lz4.frame, for comparison (no entropy stage to speak of).
  brotli  brotli, for comparison.

`constriction`, `lz4` and `brotli` are optional imports; zstandard is a
project dependency.  See kv_store/README.md for the measured comparison.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

from kvserve.kv_store.codecs.base import CodecError


class EntropyCoder(ABC):
    name: str = "?"

    @abstractmethod
    def encode(self, streams: list[np.ndarray]) -> bytes:
        """streams: 1-D int8 arrays; returns one byte string."""

    @abstractmethod
    def decode(self, data: bytes | memoryview, lengths: list[int]) -> list[np.ndarray]:
        """Inverse of encode given each stream's length; raise CodecError on bad data."""


class _ConcatCoder(EntropyCoder):
    """Byte-oriented general-purpose compressor over the concatenated streams."""

    def _compress(self, raw: bytes) -> bytes:
        raise NotImplementedError

    def _decompress(self, data: bytes | memoryview, size: int) -> bytes:
        raise NotImplementedError

    def encode(self, streams: list[np.ndarray]) -> bytes:
        raw = np.concatenate(streams).astype(np.int8, copy=False).tobytes() if streams else b""
        return self._compress(raw)

    def decode(self, data: bytes | memoryview, lengths: list[int]) -> list[np.ndarray]:
        total = sum(lengths)
        try:
            raw = self._decompress(data, total)
        except Exception as e:  # each library raises its own error type
            raise CodecError(f"{self.name}: {e}") from None
        if len(raw) != total:
            raise CodecError(f"{self.name}: decoded {len(raw)} symbols, expected {total}")
        flat = np.frombuffer(raw, dtype=np.int8)
        return np.split(flat, np.cumsum(lengths)[:-1]) if lengths else []


class ZstdCoder(_ConcatCoder):
    def __init__(self, level: int = 3) -> None:
        import zstandard

        self.name = "zstd" if level == 3 else f"zstd{level}"
        self._c = zstandard.ZstdCompressor(level=level)
        self._d = zstandard.ZstdDecompressor()

    def _compress(self, raw: bytes) -> bytes:
        return bytes(self._c.compress(raw))

    def _decompress(self, data: bytes | memoryview, size: int) -> bytes:
        return bytes(self._d.decompress(data, max_output_size=size))


class Lz4Coder(_ConcatCoder):
    name = "lz4"

    def __init__(self) -> None:
        import lz4.frame

        self._lz4 = lz4.frame

    def _compress(self, raw: bytes) -> bytes:
        return bytes(self._lz4.compress(raw))

    def _decompress(self, data: bytes | memoryview, size: int) -> bytes:
        return bytes(self._lz4.decompress(bytes(data)))


class BrotliCoder(_ConcatCoder):
    def __init__(self, quality: int = 5) -> None:
        import brotli

        self.name = f"brotli{quality}"
        self._brotli = brotli
        self._quality = quality

    def _compress(self, raw: bytes) -> bytes:
        return bytes(self._brotli.compress(raw, quality=self._quality))

    def _decompress(self, data: bytes | memoryview, size: int) -> bytes:
        return bytes(self._brotli.decompress(bytes(data)))


# ---------------------------------------------------------------- ANS (constriction)

_THETA_ONE = 65535          # theta is stored as round(theta * 65535) in a u16
_SYMBOLS = np.arange(-128, 128)


def _fit_theta_q(s: np.ndarray) -> int:
    """u16 parameter of the two-sided geometric p(k) ~ theta^|k| fitted to s.

    For that law E|k| = 2 theta / (1 - theta^2), so the MLE from the mean m of
    |k| is theta = (sqrt(1 + m^2) - 1) / m.
    """
    if len(s) == 0:
        return 0
    m = float(np.abs(s.astype(np.int32)).mean())
    theta = 0.0 if m == 0.0 else (np.sqrt(1.0 + m * m) - 1.0) / m
    return int(min(max(round(theta * _THETA_ONE), 0), _THETA_ONE - 1))


def _geometric_table(theta_q: int) -> np.ndarray:
    """Probabilities over symbols -128..127 (index k + 128).

    Built from theta_q by repeated float64 multiplication (correctly rounded
    in IEEE 754, unlike exp/pow), so every machine builds the same table and
    constriction's fixed-point model derived from it matches bit for bit.
    """
    theta = theta_q / _THETA_ONE
    # cumprod multiplies sequentially: powers[k] = theta^k, same bits everywhere.
    powers = np.cumprod(np.concatenate([[1.0], np.full(128, theta)]))
    table = powers[np.abs(_SYMBOLS)]
    # Floor keeps every symbol encodable (wrapped deltas can land anywhere).
    return np.maximum(table, 1e-9)


class AnsCoder(EntropyCoder):
    """Payload: u16 theta per stream, then the ANS words (u32, little-endian)."""

    name = "ans"

    def __init__(self) -> None:
        import constriction

        self._constriction = constriction
        self._models: dict[int, object] = {}   # theta_q -> constriction model

    def _model(self, theta_q: int) -> object:
        model = self._models.get(theta_q)
        if model is None:
            if len(self._models) >= 4096:   # bound the cache; models are cheap to rebuild
                self._models.clear()
            model = self._constriction.stream.model.Categorical(_geometric_table(theta_q), perfect=False)
            self._models[theta_q] = model
        return model

    def encode(self, streams: list[np.ndarray]) -> bytes:
        thetas = [_fit_theta_q(s) for s in streams]
        coder = self._constriction.stream.stack.AnsCoder()
        # A stack coder: push the last stream first so decoding pops in order.
        for s, tq in zip(reversed(streams), reversed(thetas)):
            if len(s):
                coder.encode_reverse(s.astype(np.int32) + 128, self._model(tq))
        words = np.asarray(coder.get_compressed()).astype("<u4", copy=False)
        return np.asarray(thetas, dtype="<u2").tobytes() + words.tobytes()

    def decode(self, data: bytes | memoryview, lengths: list[int]) -> list[np.ndarray]:
        n = len(lengths)
        if len(data) < 2 * n or (len(data) - 2 * n) % 4:
            raise CodecError("ans: bad payload length")
        thetas = np.frombuffer(data, dtype="<u2", count=n)
        words = np.frombuffer(data, dtype="<u4", offset=2 * n).astype(np.uint32)
        try:
            coder = self._constriction.stream.stack.AnsCoder(words)
            out = []
            for length, tq in zip(lengths, thetas):
                if length:
                    out.append((coder.decode(self._model(int(tq)), length) - 128).astype(np.int8))
                else:
                    out.append(np.empty(0, dtype=np.int8))
        except Exception as e:  # constriction raises ValueError/AssertionError on bad input
            raise CodecError(f"ans: {e}") from None
        if not coder.is_empty():
            raise CodecError("ans: trailing data after the last symbol")
        return out


ENTROPY_CODERS: dict[str, Callable[[], EntropyCoder]] = {
    "ans": AnsCoder,
    "zstd": ZstdCoder,
    "zstd1": lambda: ZstdCoder(1),
    "zstd9": lambda: ZstdCoder(9),
    "zstd19": lambda: ZstdCoder(19),
    "lz4": Lz4Coder,
    "brotli5": lambda: BrotliCoder(5),
    "brotli11": lambda: BrotliCoder(11),
}


def get_entropy_coder(name: str) -> EntropyCoder:
    try:
        factory = ENTROPY_CODERS[name]
    except KeyError:
        raise ValueError(f"unknown entropy coder {name!r}; known: {sorted(ENTROPY_CODERS)}") from None
    try:
        return factory()
    except ImportError as e:
        raise ValueError(f"entropy coder {name!r} needs a package that is not installed: {e}") from None

