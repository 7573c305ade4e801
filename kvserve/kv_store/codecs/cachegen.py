"""`cachegen`: layer-aware quantization + anchor deltas + entropy coding.

In the spirit of CacheGen (Liu et al., SIGCOMM'24), for one block
x: [L, 2, T, H, D] (float64 internally):

1. Quantize by layer sensitivity and channel.  Earlier layers matter more
   (CacheGen §5.2), so layer l gets b_l bits from `layer_bits`
   (first / middle / last third of the layers).  Each channel (l, kv, h, d)
   gets a step  >= absmax_over_tokens / (2^(b_l-1) - 1)  and
   q = round(x / step) in [-(2^(b_l-1)-1), 2^(b_l-1)-1].
   Steps are stored as one byte per channel: step = 2^((base + code) / 8) with
   a per-(l, kv) int16 base, `code` rounded *up* so |q| never clips.
   Error bound: |x - x^| <= step / 2 <= 2^(1/8) * absmax / (2 * (2^(b_l-1)-1)).
2. Anchor deltas.  Tokens are split into groups of `anchor_interval`; the
   first token of a group is its anchor and the others are coded as
   q[t] - q[anchor] (CacheGen §5.1: deltas to a shared anchor, not a chain,
   so groups decode independently).  Delta-ing the *integers* adds no error.
   Per (l, kv) the encoder keeps whichever of "delta" or "direct" has the
   smaller sum |symbol| (deltas help only where neighbouring tokens agree).
   Since |q| <= 127, symbols are stored modulo 256 in int8 and the decoder
   wraps back exactly.
3. Entropy coding.  Symbols go to one stream per (layer, kv, head) and
   anchor-or-not, through an entropy coder (codecs/entropy.py; the default was
   chosen by measurement, see README).  Anchor rows and other rows are coded
   as two sections, since values and deltas have different statistics.

Payload: u8 version | u8 mode[L*2] | i16 base[L*2] | u8 code[L*2*H*D]
         | u32 n | anchor section (n bytes) | other section.
"""
from __future__ import annotations

import re
import struct

import numpy as np
import torch

from kvserve.kv_store.codecs.base import Codec, CodecError, check_block_layout
from kvserve.kv_store.codecs.entropy import get_entropy_coder

_VERSION = 1
_MIN_STEP_LOG8 = -8 * 140          # steps below 2^-140 are treated as 2^-140
DEFAULT_LAYER_BITS = (8, 7, 6)
DEFAULT_ANCHOR_INTERVAL = 16
DEFAULT_ENTROPY = "zstd"


def _wrap_int8(v: np.ndarray) -> np.ndarray:
    """Map integers to int8 modulo 256 (exact inverse of wrapped subtraction)."""
    return (((v.astype(np.int16) + 128) & 255) - 128).astype(np.int8)


class CacheGenCodec(Codec):
    name = "cachegen"

    def __init__(
        self,
        layer_bits: tuple[int, int, int] = DEFAULT_LAYER_BITS,
        anchor_interval: int = DEFAULT_ANCHOR_INTERVAL,
        entropy: str = DEFAULT_ENTROPY,
    ) -> None:
        if len(layer_bits) != 3 or not all(2 <= b <= 8 for b in layer_bits):
            raise ValueError(f"cachegen layer_bits must be 3 ints in [2, 8], got {layer_bits}")
        if anchor_interval < 1:
            raise ValueError("cachegen anchor_interval must be >= 1")
        self.layer_bits = tuple(int(b) for b in layer_bits)
        self.anchor_interval = int(anchor_interval)
        self.entropy = get_entropy_coder(entropy)

    @classmethod
    def from_spec(cls, spec: str) -> "CacheGenCodec":
        """`cachegen`, or with options: `cachegen-b876-a16-ans` (any subset, any order)."""
        kwargs: dict[str, object] = {}
        for part in spec.split("-")[1:]:
            if m := re.fullmatch(r"b([2-8])([2-8])([2-8])", part):
                kwargs["layer_bits"] = tuple(int(g) for g in m.groups())
            elif m := re.fullmatch(r"a(\d+)", part):
                kwargs["anchor_interval"] = int(m.group(1))
            elif part:
                kwargs["entropy"] = part
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def identity(self) -> str:
        b = "".join(str(x) for x in self.layer_bits)
        return f"cachegen-v{_VERSION}-b{b}-a{self.anchor_interval}-{self.entropy.name}"

    # ------------------------------------------------------------ helpers

    def _levels(self, num_layers: int) -> np.ndarray:
        """Largest |q| per layer: 2^(b_l - 1) - 1, b_l by which third l falls in."""
        third = (np.arange(num_layers) * 3) // num_layers
        bits = np.asarray(self.layer_bits)[third]
        levels: np.ndarray = (2 ** (bits - 1) - 1).astype(np.float64)
        return levels

    def _anchor_mask(self, T: int) -> np.ndarray:
        mask: np.ndarray = (np.arange(T) % self.anchor_interval) == 0
        return mask

    def _anchor_index(self, T: int) -> np.ndarray:
        return (np.arange(T) // self.anchor_interval) * self.anchor_interval

    @staticmethod
    def _steps(base: np.ndarray, code: np.ndarray) -> np.ndarray:
        # [L, 2, H, D].  A libm may round exp2 differently on another machine;
        # that only rescales q by ~1e-16, it cannot change which q was stored.
        steps: np.ndarray = np.exp2((base[:, :, None, None].astype(np.float64) + code) / 8.0)
        return steps

    # ------------------------------------------------------------ encode

    def encode(self, block: torch.Tensor) -> bytes:
        side, anchors, others = self.symbols(block)
        # Anchor rows and the other rows are coded as two separate sections:
        # their statistics differ (values vs deltas), and a byte-oriented coder
        # like zstd keeps one table per section.
        anchor_body = self.entropy.encode(anchors)
        other_body = self.entropy.encode(others)
        return b"".join([side, struct.pack("<I", len(anchor_body)), anchor_body, other_body])

    def symbols(self, block: torch.Tensor) -> tuple[bytes, list[np.ndarray], list[np.ndarray]]:
        """Stages 1-2: (side info bytes, anchor-row streams, other-row streams),
        one int8 stream per (layer, kv, head).  Public for the entropy benchmark."""
        check_block_layout(block)
        # (via float32: torch's direct bf16 -> float64 cast is slow on CPU; both exact)
        x = block.detach().cpu().float().numpy().astype(np.float64)   # [L, 2, T, H, D]
        if not np.isfinite(x).all():
            raise CodecError("cachegen: non-finite values in block")
        L, _, T, H, D = x.shape
        levels = self._levels(L)[:, None, None, None]            # [L, 1, 1, 1]

        # 1. per-channel steps, rounded up to the 2^(1/8) grid.
        need = np.abs(x).max(axis=2) / levels                    # [L, 2, H, D]
        e = np.ceil(8.0 * np.log2(np.maximum(need, 2.0 ** (_MIN_STEP_LOG8 / 8))))
        e = e.astype(np.int64)
        base = e.max(axis=(2, 3)) - 255                          # [L, 2]
        code = np.clip(e - base[:, :, None, None], 0, 255).astype(np.uint8)
        step = self._steps(base, code)
        q = np.rint(x / step[:, :, None]).clip(-levels[..., None], levels[..., None]).astype(np.int16)

        # 2. anchor deltas where they pay, chosen per (layer, kv).
        is_anchor = self._anchor_mask(T)
        delta = q - q[:, :, self._anchor_index(T)]
        delta[:, :, is_anchor] = q[:, :, is_anchor]
        use_delta = np.abs(delta).sum(axis=(2, 3, 4)) < np.abs(q).sum(axis=(2, 3, 4))  # [L, 2]
        sym = _wrap_int8(np.where(use_delta[:, :, None, None, None], delta, q))

        # 3. one stream per (l, kv, h) x (anchor rows, other rows).
        sym = sym.transpose(0, 1, 3, 2, 4)                       # [L, 2, H, T, D]
        anchors = sym[:, :, :, is_anchor, :].reshape(L * 2 * H, -1)
        others = sym[:, :, :, ~is_anchor, :].reshape(L * 2 * H, -1)
        side = b"".join([
            bytes([_VERSION]),
            use_delta.astype(np.uint8).tobytes(),
            base.astype("<i2").tobytes(),
            code.tobytes(),
        ])
        return side, list(anchors), list(others)

    # ------------------------------------------------------------ decode

    def decode(self, data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) != 5 or shape[1] != 2:
            raise CodecError(f"cachegen: bad shape {shape}")
        L, _, T, H, D = shape
        side = 1 + 2 * L + 4 * L + 2 * L * H * D + 4
        mv = memoryview(data)
        if len(mv) < side or mv[0] != _VERSION:
            raise CodecError("cachegen: truncated payload or unknown version")
        off = 1
        use_delta = np.frombuffer(mv, dtype=np.uint8, count=2 * L, offset=off).reshape(L, 2)
        off += 2 * L
        base = np.frombuffer(mv, dtype="<i2", count=2 * L, offset=off).reshape(L, 2).astype(np.int64)
        off += 4 * L
        code = np.frombuffer(mv, dtype=np.uint8, count=2 * L * H * D, offset=off).reshape(L, 2, H, D)
        off += 2 * L * H * D
        if use_delta.max(initial=0) > 1:
            raise CodecError("cachegen: bad mode byte")
        (anchor_len,) = struct.unpack_from("<I", mv, off)
        off += 4
        if off + anchor_len > len(mv):
            raise CodecError("cachegen: truncated payload")

        is_anchor = self._anchor_mask(T)
        n_anchor = int(is_anchor.sum())
        n_streams = L * 2 * H
        anchors = self.entropy.decode(mv[off:off + anchor_len], [n_anchor * D] * n_streams)
        others = self.entropy.decode(mv[off + anchor_len:], [(T - n_anchor) * D] * n_streams)
        sym = np.empty((L, 2, H, T, D), dtype=np.int8)
        sym[:, :, :, is_anchor, :] = np.stack(anchors).reshape(L, 2, H, n_anchor, D)
        sym[:, :, :, ~is_anchor, :] = np.stack(others).reshape(L, 2, H, T - n_anchor, D)
        sym = sym.transpose(0, 1, 3, 2, 4).astype(np.int16)      # [L, 2, T, H, D]

        # Undo deltas: q[t] = wrap(s[t] + s[anchor(t)]) for non-anchor tokens of delta-coded (l, kv).
        undone = _wrap_int8(sym + sym[:, :, self._anchor_index(T)]).astype(np.int16)
        undone[:, :, is_anchor] = sym[:, :, is_anchor]
        q = np.where(use_delta[:, :, None, None, None].astype(bool), undone, sym)
        x = q * self._steps(base, code)[:, :, None]
        return torch.from_numpy(x.astype(np.float32)).to(dtype)
