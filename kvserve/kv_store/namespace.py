"""KV namespace: everything besides the tokens that decides a block's bytes.

Two engines may share a block only if they run the same weights with the same
KV dtype, layout and codec.  The namespace digest is mixed into every stored
key, so a different model (or dtype, block size, codec, ...) can never read
another's entries: it computes different keys and sees misses.  The digest is
also written into every stored header and checked on read, which catches
entries moved or copied under a wrong name.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvserve.core.hashing import BlockHash

# The block layout every tier and codec assumes; bump if it ever changes.
LAYOUT_L2THD = "L2THD-v1"  # [num_layers, 2 (K,V), block_size, num_kv_heads, head_dim]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_KEY_DOMAIN = b"kvserve-kv-store-key-v1"


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {dtype}; expected one of {sorted(DTYPES)}") from None


@dataclass(frozen=True, slots=True)
class KVNamespace:
    """Identity of a KV block's encoding.

    model_id: names the *weights*, not only the architecture: e.g. a hub id plus
        revision, or `model_fingerprint(model_dir)`.  Two fine-tunes of one
        architecture must differ here.
    extra: anything else that changes the KV bytes, e.g. "tp=2/rank=0" for a
        tensor-parallel shard, or a RoPE scaling setting.
    codec: codec identity; tiers fill it in with `with_codec`.
    """

    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    layout: str = LAYOUT_L2THD
    codec: str = "raw"
    extra: str = ""

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("KVNamespace.model_id must be non-empty")
        if self.dtype not in DTYPES:
            raise ValueError(f"KVNamespace.dtype {self.dtype!r} not in {sorted(DTYPES)}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"KVNamespace.{name} must be a positive int, got {v!r}")
        if self.layout != LAYOUT_L2THD:
            raise ValueError(f"unsupported KV layout {self.layout!r}")

    @classmethod
    def create(
        cls,
        model_id: str,
        dtype: torch.dtype | str,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        extra: str = "",
    ) -> "KVNamespace":
        name = dtype if isinstance(dtype, str) else dtype_name(dtype)
        return cls(model_id, name, num_layers, num_kv_heads, head_dim, block_size, extra=extra)

    def with_codec(self, codec_identity: str) -> "KVNamespace":
        return dataclasses.replace(self, codec=codec_identity)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_nbytes(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * self.torch_dtype.itemsize

    def digest(self) -> bytes:
        """32-byte SHA-256 of a canonical encoding of every field."""
        return _namespace_digest(self)

    def storage_key(self, block_hash: BlockHash) -> bytes:
        """Key an entry is stored under: H(namespace digest || block hash)."""
        return hashlib.sha256(_KEY_DOMAIN + self.digest() + block_hash).digest()

    def check_block(self, block: torch.Tensor) -> None:
        if not isinstance(block, torch.Tensor):
            raise ValueError(f"KV block must be a torch.Tensor, got {type(block).__name__}")
        if tuple(block.shape) != self.block_shape:
            raise ValueError(f"KV block shape {tuple(block.shape)} != namespace {self.block_shape}")
        if block.dtype != self.torch_dtype:
            raise ValueError(f"KV block dtype {block.dtype} != namespace {self.torch_dtype}")


@functools.lru_cache(maxsize=256)
def _namespace_digest(ns: KVNamespace) -> bytes:
    # Cached: storage_key() needs it on every lookup; namespaces are frozen.
    canon = json.dumps(dataclasses.asdict(ns), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(b"kvserve-kv-namespace-v1\0" + canon.encode()).digest()


def model_fingerprint(model_dir: str | os.PathLike[str], sample_bytes: int = 1 << 16) -> str:
    """A cheap identity for the weights in a local HF model directory (or a .gguf file).

    Hashes config.json and, for each *.safetensors/*.bin file, its name, size
    and 16 evenly spaced samples of `sample_bytes` bytes (the file head holds
    the tensor index, the samples catch fine-tunes with an equal index).
    Not a full content hash: a change confined to unsampled bytes goes unseen;
    pass a hub revision as model_id where that matters.
    """
    root = Path(model_dir)
    h = hashlib.sha256(b"kvserve-model-fingerprint-v1\0")
    cfg = root / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    if root.is_file():  # a single-file checkpoint (.gguf): config and weights in one file
        weights = [root]
    else:
        weights = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin"))
    for p in weights:
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with p.open("rb") as f:
            for i in range(16):
                f.seek((size * i) // 16)
                h.update(f.read(sample_bytes))
    return f"{root.name}@{h.hexdigest()[:32]}"
