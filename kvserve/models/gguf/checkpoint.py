"""A GGUF file as an HF checkpoint: (HF tensor name, source, reader) triples, its config and tokenizer.

`kvserve/models/loader.py` consumes `iter_gguf_checkpoint` exactly as it consumes a safetensors
directory, so GGUF weights take the same name mapping (HF names -> fused kvserve parameters) and
the same shape checks.  Each entry point uses the dequantized cache (gguf/cache.py) when it is
enabled, and the GGUF file itself otherwise; tests hold the two paths equal.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from kvserve.models.gguf.config import hf_config
from kvserve.models.gguf.dequant import BLOCK_KERNELS, FLOAT_TYPES, dequantize, supported_types
from kvserve.models.gguf.names import IGNORED, PERMUTED_QK, hf_name, qk_heads, unpermute_rows
from kvserve.models.gguf.reader import GGUFFile, GGUFTensorInfo, open_gguf

TensorReader = Callable[[], torch.Tensor]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Dequantization is a chain of small elementwise ops, and loading is memory copies; on a
    busy 2-core machine torch's 2-thread pool spends most of that time at barriers
    (SmolLM2-135M dequantization: 0.8 s on 1 thread, 2.7-9.6 s on 2; docs/gguf.md), so both
    run on one."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def check_tensor_types(gf: GGUFFile) -> None:
    """Fail before loading anything if a tensor has a type kvserve cannot turn into floats."""
    ok = set(supported_types())
    for info in gf.tensors.values():
        if info.type_name not in ok:
            raise ValueError(f"{gf.path}: tensor {info.name!r} has GGML type {info.type_name}, which kvserve "
                             f"cannot dequantize; supported: {', '.join(sorted(ok))}")


def stored_dtype(info: GGUFTensorInfo) -> torch.dtype:
    """The dtype `dequantize` returns for this tensor (float types as stored, blocks as float32)."""
    return FLOAT_TYPES.get(info.type_name, torch.float32)


def iter_gguf_tensors(gf: GGUFFile, cfg: dict[str, Any]) -> Iterator[tuple[str, GGUFTensorInfo, TensorReader]]:
    """(HF name, tensor info, reader) for each weight, Q/K rows restored to HF's order."""
    check_tensor_types(gf)
    permuted = gf.architecture in PERMUTED_QK
    heads, kv_heads = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
    for name, info in gf.tensors.items():
        if name in IGNORED:
            continue
        hf = hf_name(name)
        if hf is None:
            raise ValueError(f"{gf.path}: unexpected tensor {name!r} (GGML type {info.type_name}) "
                             f"for GGUF architecture {gf.architecture!r}")
        n = qk_heads(hf, heads, kv_heads) if permuted else None

        def read(info: GGUFTensorInfo = info, n: int | None = n) -> torch.Tensor:
            w = dequantize(info)
            return unpermute_rows(w, n) if n else w

        yield hf, info, read


def _direct(path: Path) -> Iterator[tuple[str, Path, TensorReader]]:
    gf = open_gguf(path)
    cfg = hf_config(gf)
    with single_thread():
        for hf, _info, read in iter_gguf_tensors(gf, cfg):
            yield hf, path, read


def iter_gguf_checkpoint(path: str | Path, use_cache: bool = True) -> Iterator[tuple[str, Path, TensorReader]]:
    """The loader's checkpoint iterator for a .gguf file (see loader.iter_checkpoint)."""
    from kvserve.models.gguf.cache import ensure_cache

    path = Path(path)
    cached = ensure_cache(path) if use_cache else None
    if cached is None:
        yield from _direct(path)
        return
    from kvserve.models.loader import iter_checkpoint

    with single_thread():  # the loader's copies into fresh parameters: 0.6 s CPU on 1 thread, 1.9 s on 2
        for name, _file, read in iter_checkpoint(cached):
            yield name, path, read


def gguf_config_dict(path: str | Path, use_cache: bool = True) -> dict[str, Any]:
    """The HF config.json dict of a .gguf file."""
    from kvserve.models.gguf.cache import ensure_cache

    cached = ensure_cache(Path(path)) if use_cache else None
    if cached is not None:
        return json.loads((cached / "config.json").read_text())
    return hf_config(open_gguf(path))


def load_gguf_tokenizer(path: str | Path, use_cache: bool = True) -> Any:
    """The tokenizer of a .gguf file; FileNotFoundError if it has none."""
    from kvserve.models.gguf.cache import ensure_cache
    from kvserve.models.gguf.tokenizer import build_tokenizer

    cached = ensure_cache(Path(path)) if use_cache else None
    if cached is None:
        return build_tokenizer(open_gguf(path))
    if not (cached / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: the GGUF file has no tokenizer metadata (tokenizer.ggml.tokens)")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(cached), local_files_only=True)


__all__ = ["BLOCK_KERNELS", "check_tensor_types", "gguf_config_dict", "iter_gguf_checkpoint",
           "iter_gguf_tensors", "load_gguf_tokenizer", "stored_dtype"]
