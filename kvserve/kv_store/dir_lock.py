"""An advisory, exclusive lock on a disk tier's directory (fcntl.flock).

A disk tier keeps its size cap with an in-memory index of the files it wrote,
so two tiers writing one directory at once (two processes, or two tiers in one
process) each count only their own files and together overrun the cap.  The
first tier to open a directory takes `PATH/.lock`; any other opener gets a
`DiskTierLockedError` naming the holder's pid, instead of silently sharing.

flock locks belong to the open file, so the kernel drops the lock when the
holder closes it or dies (a crashed process never leaves a stale lock; the pid
written in the file is only for the message).  Where flock is not supported
(some network filesystems) the lock is skipped with a warning.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class DiskTierLockedError(RuntimeError):
    """The directory is already used by another open disk tier."""


class DirectoryLock:
    """Hold an exclusive flock on `root/.lock` until `release()` (idempotent).

    The lock file is a Python file object, so a tier dropped without `close()`
    still releases the lock when it is garbage-collected."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_NAME
        f = open(self.path, "a+b")  # noqa: SIM115 - held until release()
        self._file: BinaryIO | None = f
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(f)
            self.release()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DiskTierLockedError(_locked_message(Path(root), holder)) from None
            logger.warning("disk tier %s: cannot lock the directory (%s); make sure no other process "
                           "uses it, or its size cap will not hold", root, e)
            return
        os.ftruncate(f.fileno(), 0)
        os.pwrite(f.fileno(), f"{os.getpid()}\n".encode(), 0)

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()  # closing the file drops the flock


def _read_pid(f: BinaryIO) -> int | None:
    try:
        text = os.pread(f.fileno(), 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _locked_message(root: Path, holder: int | None) -> str:
    who = ("another disk tier of this process" if holder == os.getpid()
           else f"process {holder}" if holder is not None else "another process")
    return (f"disk tier {root} is in use by {who}: a disk tier directory serves one engine at a time "
            f"(each keeps the size cap with its own index). Use a different directory per engine, "
            f"share blocks between engines through a redis:// tier, or close the other one first.")
