"""Open a GGUF file with the `gguf` package (llama.cpp's reader) and expose what kvserve needs.

`gguf.GGUFReader` slices its `np.memmap` once per metadata value.  A memmap slice runs
Python-level `__array_finalize__`, so a file with a 49k-token vocabulary took ~11 s to open;
over a plain ndarray view of the same mapping (`_PlainViewReader`) the same parse takes ~1 s.
The tensor data stays memory-mapped either way: nothing is read until a tensor is dequantized.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

GGUF_SUFFIX = ".gguf"


def is_gguf_path(path: str | os.PathLike[str]) -> bool:
    """True for an existing file whose name ends in .gguf (the only single-file checkpoint kvserve reads)."""
    p = Path(path)
    return p.suffix.lower() == GGUF_SUFFIX and p.is_file()


def _reader_class() -> type:
    import gguf

    class _PlainViewReader(gguf.GGUFReader):
        # GGUFReader assigns `self.data = np.memmap(...)` in __init__ and slices it from then on;
        # keep a plain ndarray view of the mapping instead (same buffer, no copy).
        @property  # type: ignore[override]  # an ndarray view where the base class has its memmap
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = value.view(np.ndarray)

    return _PlainViewReader


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type_name: str  # GGMLQuantizationType name: F32, Q4_K, ...
    shape: tuple[int, ...]  # torch order ([out, in] for a linear weight): GGUF's ne reversed
    raw: Any  # numpy view of the stored data (float values, or uint8 blocks of shape [rows, bytes])
    type_id: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


class GGUFFile:
    """A GGUF file's metadata and tensor index.  `metadata(key)` decodes one value on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: GGUF file does not exist")
        try:
            # mode "c" (copy-on-write): the arrays are writable for torch.from_numpy, and the
            # file is never modified.
            self._reader = _reader_class()(str(self.path), "c")
        except Exception as exc:  # noqa: BLE001 - the gguf package raises ValueError/KeyError/struct errors
            raise ValueError(f"{self.path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for t in self._reader.tensors:
            qtype = t.tensor_type
            self.tensors[t.name] = GGUFTensorInfo(
                name=t.name, type_name=qtype.name, shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                raw=t.data, type_id=int(qtype),
            )

    @property
    def architecture(self) -> str:
        return str(self.metadata("general.architecture", ""))

    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def keys(self) -> list[str]:
        return list(self._reader.fields)

    def metadata(self, key: str, default: Any = None) -> Any:
        """The decoded value of `key` (int, float, bool, str or list), or `default`."""
        field = self._reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        return value

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """`{architecture}.{suffix}`, e.g. arch_key("block_count")."""
        return self.metadata(f"{self.architecture}.{suffix}", default)


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _open_cached(key: tuple[str, int, int]) -> GGUFFile:
    return GGUFFile(key[0])


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """The parsed file, shared within the process (config, tokenizer and weights all read it);
    a file replaced on disk (other size or mtime) is parsed again."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: GGUF file does not exist")
    return _open_cached(_stat_key(p))


def forget_parsed() -> None:
    """Drop the parsed files kept by `open_gguf` (after the cache is built, nothing reads them)."""
    _open_cached.cache_clear()


def source_stamp(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies the file's contents cheaply: resolved path, size and mtime (ns)."""
    real, size, mtime = _stat_key(Path(path))
    return {"path": real, "size": size, "mtime_ns": mtime}


def optional_int(value: Optional[Any]) -> Optional[int]:
    return None if value is None else int(value)
