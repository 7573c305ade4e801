"""The dequantized cache: a GGUF file unpacked once into a plain HF model directory.

Opening a GGUF (metadata parse ~1 s), building its tokenizer (~1.5 s) and dequantizing its
weights (~1 s) is paid on every start; reading the same model from safetensors takes a fraction
of that.  So the first load writes

    $KVSERVE_CACHE_DIR (default ~/.cache/kvserve)/gguf/<stem>-<sha256(real path)[:12]>/
        config.json  model.safetensors  tokenizer.json  tokenizer_config.json ...  source.json

and later loads read it.  `source.json` records the GGUF's real path, size and mtime (ns) and the
cache format; a cache whose record does not match the file as it is now is rebuilt, so a file
replaced in place is never served stale.  The directory is built under a temporary name and
renamed into place (a reader never sees half a cache), under a lock file so that the API and
engine processes of `kvserve serve`, starting together, build it once.

Weights are stored exactly as the direct path produces them (block types as float32, float types
as stored, HF names, Q/K rows unpermuted), so both paths load identical tensors.  Off with
KVSERVE_GGUF_CACHE=0; skipped for models above KVSERVE_GGUF_CACHE_MAX_BYTES (default 4 GiB of
dequantized weights), and on any OS error writing it (then the GGUF is read directly).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from kvserve.models.gguf.reader import GGUFFile, forget_parsed, open_gguf, source_stamp

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
DEFAULT_MAX_BYTES = 4 << 30
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_STALE_TMP_S = 3600.0


def cache_enabled() -> bool:
    return os.environ.get("KVSERVE_GGUF_CACHE", "1").strip().lower() not in ("0", "off", "false", "no")


def cache_root() -> Path:
    base = os.environ.get("KVSERVE_CACHE_DIR")
    if base:
        return Path(base) / "gguf"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvserve" / "gguf"


def cache_dir_for(path: str | os.PathLike[str]) -> Path:
    real = str(Path(path).resolve())
    return cache_root() / f"{Path(real).stem}-{hashlib.sha256(real.encode()).hexdigest()[:12]}"


def _record(stamp: dict[str, Any]) -> dict[str, Any]:
    return {**stamp, "format": CACHE_FORMAT}


def is_valid(cache: Path, stamp: dict[str, Any]) -> bool:
    try:
        recorded = json.loads((cache / "source.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == _record(stamp) and (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()


def valid_cache(path: str | os.PathLike[str]) -> Optional[Path]:
    """The cache of `path` if one exists and matches the file now; never builds one."""
    if not cache_enabled():
        return None
    cache = cache_dir_for(path)
    return cache if is_valid(cache, source_stamp(path)) else None


def _max_bytes() -> int:
    try:
        return int(os.environ.get("KVSERVE_GGUF_CACHE_MAX_BYTES", DEFAULT_MAX_BYTES))
    except ValueError:
        return DEFAULT_MAX_BYTES


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock; the atomic rename still holds
        yield
        return
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_cache(path: str | os.PathLike[str]) -> Optional[Path]:
    """The valid cache directory of GGUF `path`, building it if needed; None when the cache is
    off, the model is above the size limit, or the cache cannot be written.  Errors about the
    model itself (unsupported architecture or type) propagate."""
    if not cache_enabled():
        return None
    stamp = source_stamp(path)
    cache = cache_dir_for(path)
    if is_valid(cache, stamp):
        return cache
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with _locked(cache.parent / f"{cache.name}.lock"):
            if is_valid(cache, stamp):  # built by another process while we waited
                return cache
            gf = open_gguf(path)
            size = dequantized_bytes(gf)
            if size > _max_bytes():
                logger.info("%s: %.1f GiB dequantized is above KVSERVE_GGUF_CACHE_MAX_BYTES; not caching",
                            path, size / 2**30)
                return None
            t0 = time.perf_counter()
            build_cache(gf, cache, stamp)
            logger.info("%s: dequantized cache written to %s in %.1f s", path, cache, time.perf_counter() - t0)
            del gf
            forget_parsed()  # from here on every read goes to the cache: free the parsed metadata
            return cache
    except OSError as exc:
        logger.warning("cannot write the GGUF cache at %s (%s); reading %s directly", cache, exc, path)
        return None


def dequantized_bytes(gf: GGUFFile) -> int:
    from kvserve.models.gguf.checkpoint import stored_dtype

    return sum(info.numel * stored_dtype(info).itemsize for info in gf.tensors.values())


def build_cache(gf: GGUFFile, cache: Path, stamp: dict[str, Any]) -> None:
    """Write the HF directory for `gf` to `cache` (replacing what is there), atomically."""
    from kvserve.models.gguf.checkpoint import iter_gguf_tensors, single_thread, stored_dtype
    from kvserve.models.gguf.config import hf_config
    from kvserve.models.gguf.tokenizer import build_tokenizer, has_tokenizer

    cfg = hf_config(gf)  # raises first for what kvserve cannot run
    _remove_stale_tmp(cache.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if has_tokenizer(gf):
            build_tokenizer(gf).save_pretrained(str(tmp))
        entries = list(iter_gguf_tensors(gf, cfg))
        with single_thread():
            write_safetensors(tmp / "model.safetensors",
                              [(hf, stored_dtype(info), info.shape) for hf, info, _ in entries],
                              (read() for _, _, read in entries))
        (tmp / "source.json").write_text(json.dumps(_record(stamp), indent=2))
        if cache.exists():
            shutil.rmtree(cache)
        os.rename(tmp, cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_tmp(root: Path) -> None:
    """Temporary directories left by a process killed mid-build."""
    now = time.time()
    for p in root.glob(".*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[torch.Tensor]) -> None:
    """Stream tensors into a safetensors file one at a time (the header is known up front from
    `entries`), so a model is never held twice in memory.  Format: u64 little-endian header
    length, the JSON header (offsets relative to the data start, padded to 8 bytes), the data."""
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    count = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, dtype, shape), t in zip(entries, tensors):
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, header says {dtype} {tuple(shape)}")
            f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
            count += 1
    if count != len(entries):
        raise ValueError(f"{path}: wrote {count} of {len(entries)} tensors")
