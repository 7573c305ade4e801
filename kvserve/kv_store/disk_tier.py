"""`disk:PATH:SIZE`: a directory of block files, strict size bound, LRU by access.

Layout:  PATH/<k[0:2]>/<k>.kvb  with k = hex(namespace.storage_key(block_hash)),
         PATH/tmp/              in-flight writes (renamed into place when complete).

Each file is one entry in the file_format.py container (magic, version,
namespace digest, block hash, codec, dtype, shape, BLAKE2b checksum).

* Writes are atomic: write to PATH/tmp, then os.replace into place, so a
  reader never sees a half-written file under a final name.  There is no
  fsync: after a power loss a renamed file may hold garbage, which the
  checksum catches on read (a cache may lose entries, never serve bad ones).
* Recency is the file mtime.  Every put/get sets it from a strictly
  increasing clock, so a restart rebuilds the exact LRU order by scanning
  the directory and sorting by mtime (atime is unreliable under noatime).
* The size bound counts file sizes (header + payload) of every *.kvb file in
  the directory, whichever namespace wrote it: the directory is the bounded
  cache.  Filesystem block rounding is not counted.
* The in-memory index is authoritative for this process, so one directory
  is used by one tier at a time: the tier holds an exclusive advisory lock
  (fcntl.flock on PATH/.lock, dir_lock.py) from open to close, and a second
  opener - another process or another tier of this process - gets a
  DiskTierLockedError instead of silently overrunning the cap.
* Checksums are checked on read only, so an entry found by the start-up scan
  is *unverified* until it is read.  A put of a key the index holds only
  refreshes its recency when the entry is verified (written or read by this
  tier); an unverified one is rewritten, so after a crash or corruption the
  blocks the engine recomputes replace whatever the files hold (a corrupt
  tier heals in one pass instead of one load chunk per run).  A key found
  corrupt on read is dropped from the index at once.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import time
from collections import OrderedDict
from pathlib import Path

from kvserve.core.hashing import BlockHash
from kvserve.kv_store.base import KVBlock, KVTier
from kvserve.kv_store.codecs.base import Codec, CodecError
from kvserve.kv_store.dir_lock import DirectoryLock, DiskTierLockedError  # noqa: F401  (re-exported)
from kvserve.kv_store.entry import EntrySerializer
from kvserve.kv_store.file_format import CorruptEntry
from kvserve.kv_store.namespace import KVNamespace

logger = logging.getLogger(__name__)

SUFFIX = ".kvb"
_NAME_RE = re.compile(r"^[0-9a-f]{64}\.kvb$")
_STALE_TMP_S = 60.0
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskTier(KVTier):
    scheme = "disk"
    persistent = True

    def __init__(self, namespace: KVNamespace, codec: Codec, root: str | os.PathLike[str],
                 capacity_bytes: int) -> None:
        super().__init__(namespace, codec)
        if capacity_bytes <= 0:
            raise ValueError("disk tier capacity must be positive")
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._dir_lock: DirectoryLock | None = DirectoryLock(self.root)  # raises DiskTierLockedError
        self._capacity = int(capacity_bytes)
        self._serializer = EntrySerializer(self.namespace, codec)
        # storage key -> file size; order = LRU (first) ... MRU (last).
        self._index: OrderedDict[bytes, int] = OrderedDict()
        # Indexed keys found by the start-up scan and not yet read (see the module doc).
        self._unverified: set[bytes] = set()
        self._used = 0
        self._clock_ns = 0          # last mtime assigned; strictly increasing
        self._tmp_seq = itertools.count()
        try:
            self._scan()
        except BaseException:
            self._release_lock()
            raise

    # ----- introspection ----------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._index)

    def describe(self) -> str:
        return f"disk({self.root}, {self._capacity} B, codec={self.codec.identity})"

    def path_for(self, block_hash: BlockHash) -> Path:
        """Where this tier stores `block_hash` (for tests and tooling)."""
        return self._path(self.namespace.storage_key(block_hash))

    def keys_lru_order(self) -> list[bytes]:
        """Storage keys from least to most recently used."""
        with self._lock:
            return list(self._index)

    # ----- startup ----------------------------------------------------------

    def _scan(self) -> None:
        now = time.time()
        for tmp in self._tmp.iterdir():
            try:  # leftovers of a crashed writer (young ones may be another process's)
                if now - tmp.stat().st_mtime > _STALE_TMP_S:
                    tmp.unlink()
            except OSError:
                pass
        found: list[tuple[int, str, int]] = []
        for sub in self.root.iterdir():
            if not (sub.is_dir() and len(sub.name) == 2):
                continue
            with os.scandir(sub) as it:
                for ent in it:
                    if _NAME_RE.match(ent.name) and ent.is_file():
                        st = ent.stat()
                        found.append((st.st_mtime_ns, ent.name, st.st_size))
        found.sort()
        for mtime_ns, name, size in found:
            skey = bytes.fromhex(name[:64])
            self._index[skey] = size
            self._unverified.add(skey)
            self._used += size
            self._clock_ns = max(self._clock_ns, mtime_ns)
        if found:
            logger.info("disk tier %s: found %d entries, %d bytes", self.root, len(found), self._used)
        while self._used > self._capacity:   # capacity may have shrunk since last run
            self._evict_lru()

    # ----- helpers ----------------------------------------------------------

    def _path(self, skey: bytes) -> Path:
        h = skey.hex()
        return self.root / h[:2] / (h + SUFFIX)

    def _touch(self, path: Path) -> None:
        t = max(time.time_ns(), self._clock_ns + 1)
        self._clock_ns = t
        os.utime(path, ns=(t, t))

    def _forget(self, skey: bytes, delete: bool) -> None:
        size = self._index.pop(skey, None)
        self._unverified.discard(skey)
        if size is not None:
            self._used -= size
        if delete:
            try:
                self._path(skey).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.warning("disk tier: could not delete %s: %s", self._path(skey), e)
                self._stats.errors += 1

    def _load_any(self, skey: bytes) -> tuple[BlockHash, KVBlock] | None:
        try:
            return self._serializer.unpack(self._path(skey).read_bytes(), None)
        except (OSError, CorruptEntry):
            return None   # other namespace or unreadable: nothing to demote

    def _evict_lru(self) -> None:
        skey = next(iter(self._index))
        loaded: tuple[BlockHash, KVBlock] | None = None
        if self._eviction_listener is not None:
            loaded = self._load_any(skey)
        self._forget(skey, delete=True)
        self._stats.evictions += 1
        if loaded is not None:
            bh, block = loaded
            self._notify_evicted(bh, lambda: block)

    def _evict_bytes(self, nbytes: int) -> None:
        freed = 0
        while self._index and freed < nbytes:
            freed += next(iter(self._index.values()))
            self._evict_lru()

    # ----- hooks ------------------------------------------------------------

    def _contains(self, key: BlockHash) -> bool:
        return self.namespace.storage_key(key) in self._index

    def _get(self, key: BlockHash) -> KVBlock | None:
        skey = self.namespace.storage_key(key)
        if skey not in self._index:
            return None
        path = self._path(skey)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            logger.warning("disk tier: %s vanished; dropping it from the index", path)
            self._forget(skey, delete=False)
            return None
        except OSError as e:
            logger.warning("disk tier: cannot read %s: %s", path, e)
            self._stats.errors += 1
            return None
        try:
            _, block = self._serializer.unpack(data, key)
        except CorruptEntry as e:
            logger.warning("disk tier: dropping bad entry %s: %s", path, e)
            self._stats.corrupt += 1
            self._forget(skey, delete=True)
            return None
        try:
            self._touch(path)
        except OSError:
            pass  # recency across restarts is best effort
        self._index.move_to_end(skey)
        self._unverified.discard(skey)
        self._stats.bytes_read += len(data)
        return block

    def _put(self, key: BlockHash, block: KVBlock) -> None:
        skey = self.namespace.storage_key(key)
        if skey in self._index:
            if skey not in self._unverified:
                # Same key => same KV, and this entry is known good: refresh recency only.
                self._index.move_to_end(skey)
                try:
                    self._touch(self._path(skey))
                except OSError:
                    pass
                return
        try:
            header, payload = self._serializer.pack(key, block)
        except CodecError as e:
            logger.warning("disk tier: dropping put, encode failed: %s", e)
            self._stats.dropped_puts += 1
            return
        size = len(header) + len(payload)
        if size > self._capacity:
            logger.warning("disk tier: entry of %d B exceeds capacity %d B; dropping put", size, self._capacity)
            self._stats.dropped_puts += 1
            return
        if skey in self._index:
            # Never read since the start-up scan, so it may be corrupt: replace it.
            self._forget(skey, delete=True)
        while self._used + size > self._capacity:
            self._evict_lru()
        if not self._write_with_retry(skey, header, payload):
            self._stats.dropped_puts += 1
            return
        self._index[skey] = size
        self._used += size
        self._stats.bytes_written += size

    def _write_with_retry(self, skey: bytes, header: bytes, payload: bytes) -> bool:
        """Write atomically; on a full disk evict and retry once.  Never raises."""
        size = len(header) + len(payload)
        for attempt in (1, 2):
            try:
                self._write_atomic(skey, header, payload)
                return True
            except OSError as e:
                if e.errno in _DISK_FULL and attempt == 1:
                    # Free at least this entry's size (more if we hold a lot) and retry.
                    want = max(size, self._used // 8)
                    logger.warning("disk tier %s: disk full; evicting %d B and retrying", self.root, want)
                    self._evict_bytes(want)
                    continue
                logger.warning("disk tier %s: dropping put, write failed: %s", self.root, e)
                self._stats.errors += 1
                return False
        return False

    def _write_atomic(self, skey: bytes, header: bytes, payload: bytes) -> None:
        final = self._path(skey)
        tmp = self._tmp / f"{skey.hex()}.{os.getpid()}.{next(self._tmp_seq)}.tmp"
        try:
            self._write_file(tmp, header, payload)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        try:
            self._touch(final)
        except OSError:
            pass  # the entry is in place; only its recency across restarts suffers

    def _write_file(self, path: Path, header: bytes, payload: bytes) -> None:
        # Its own method so tests can inject failures (e.g. ENOSPC) at the write.
        with open(path, "wb") as f:
            f.write(header)
            f.write(payload)

    def _remove(self, key: BlockHash) -> None:
        self._forget(self.namespace.storage_key(key), delete=True)

    def _clear(self) -> None:
        """Delete every entry file in the directory (all namespaces)."""
        for skey in list(self._index):
            self._forget(skey, delete=True)

    def _close(self) -> None:
        """Release the directory lock (the files stay for the next process)."""
        self._release_lock()

    def _release_lock(self) -> None:
        lock, self._dir_lock = self._dir_lock, None
        if lock is not None:
            lock.release()

    @property
    def num_unverified(self) -> int:
        """Entries found by the start-up scan and not yet read or rewritten."""
        return len(self._unverified)

