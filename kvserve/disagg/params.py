"""`kv_transfer_params`: the plain JSON that travels client -> prefill -> router -> decode.

vLLM's disaggregated-prefill handshake, so a router speaking it (kvserve's, or another) works:

    to the prefill instance:   {"do_remote_decode": true}
    its answer carries:        {"do_remote_prefill": true, "transfer_id": ..., "transport": "shm"|"ray",
                                "locator": {...}, "num_prompt_tokens": P, "first_token_id": T,
                                "block_size": 16, "block_hashes": [64-hex, ...], "layout": {...},
                                "expires_at": UNIX_TIME}
    to the decode instance:    that answer's object, unchanged

`block_hashes` are the engine's own chained hashes of the prompt's full blocks: the decode
instance recomputes them from the prompt and refuses a transfer that does not match, and it
fetches only the blocks its prefix cache lacks.  `layout` (layers, KV heads, head dim, dtype)
must equal the decode instance's pool layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """Prefill side: compute the prompt, sample the first token, export the KV."""


@dataclass(frozen=True, slots=True)
class Layout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch.", e.g. "float32"

    def to_json(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "dtype": self.dtype}


@dataclass(frozen=True, slots=True)
class ImportParams:
    """Decode side: where a prefill instance left a request's KV."""

    transfer_id: str
    transport: str
    locator: dict[str, Any]
    num_prompt_tokens: int
    first_token_id: int
    block_size: int
    block_hashes: tuple[bytes, ...]
    layout: Layout
    expires_at: float

    @property
    def num_blocks(self) -> int:
        """Blocks holding the prompt's KV: the full ones, plus a partial last one."""
        return -(-self.num_prompt_tokens // self.block_size)

    def to_json(self) -> dict[str, Any]:
        return {"do_remote_prefill": True, "transfer_id": self.transfer_id, "transport": self.transport,
                "locator": self.locator, "num_prompt_tokens": self.num_prompt_tokens,
                "first_token_id": self.first_token_id, "block_size": self.block_size,
                "block_hashes": [h.hex() for h in self.block_hashes], "layout": self.layout.to_json(),
                "expires_at": self.expires_at}


Parsed = Union[ExportRequest, ImportParams, None]


def _int(d: dict[str, Any], key: str, lo: int = 0) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"kv_transfer_params.{key} must be an integer >= {lo}, got {v!r}")
    return v


def parse_params(raw: Optional[dict[str, Any]]) -> Parsed:
    """The request's role in a transfer; ValueError names the malformed field."""
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict):
        raise ValueError("kv_transfer_params must be an object")
    if raw.get("do_remote_decode") is True:
        return ExportRequest()
    if raw.get("do_remote_prefill") is not True:
        raise ValueError("kv_transfer_params needs do_remote_decode: true (to a prefill instance) or a prefill "
                         "instance's answer with do_remote_prefill: true (to a decode instance)")
    tid = raw.get("transfer_id")
    transport = raw.get("transport")
    locator = raw.get("locator")
    if not isinstance(tid, str) or not tid:
        raise ValueError("kv_transfer_params.transfer_id must be a non-empty string")
    if transport not in ("shm", "ray"):
        raise ValueError(f"kv_transfer_params.transport must be 'shm' or 'ray', got {transport!r}")
    if not isinstance(locator, dict):
        raise ValueError("kv_transfer_params.locator must be an object")
    hashes = raw.get("block_hashes")
    if not isinstance(hashes, list) or not all(isinstance(h, str) and len(h) == 64 for h in hashes):
        raise ValueError("kv_transfer_params.block_hashes must be a list of 64-hex-digit block hashes")
    try:
        block_hashes = tuple(bytes.fromhex(h) for h in hashes)
    except ValueError:
        raise ValueError("kv_transfer_params.block_hashes must be hex strings") from None
    lay = raw.get("layout")
    if not isinstance(lay, dict) or not isinstance(lay.get("dtype"), str):
        raise ValueError("kv_transfer_params.layout must be {num_layers, num_kv_heads, head_dim, dtype}")
    layout = Layout(_int(lay, "num_layers", 1), _int(lay, "num_kv_heads", 1), _int(lay, "head_dim", 1), lay["dtype"])
    expires = raw.get("expires_at")
    if not isinstance(expires, (int, float)) or isinstance(expires, bool):
        raise ValueError("kv_transfer_params.expires_at must be a number (UNIX time)")
    p = ImportParams(tid, transport, locator, _int(raw, "num_prompt_tokens", 1), _int(raw, "first_token_id"),
                     _int(raw, "block_size", 1), block_hashes, layout, float(expires))
    if len(block_hashes) != p.num_prompt_tokens // p.block_size:
        raise ValueError(f"kv_transfer_params has {len(block_hashes)} block hashes for {p.num_prompt_tokens} "
                         f"prompt tokens in blocks of {p.block_size}")
    return p
