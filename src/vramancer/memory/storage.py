"""Rules for the memory store's files, kept in one place.

* A full disk while writing (:func:`full_disk_as`) becomes
  :class:`~vramancer.errors.InsufficientStorage` (HTTP 507); which errors mean "full" is the
  kernel's rule, :func:`vramancer.errors.is_disk_full`.
* What the store may remove (:func:`unlink_inside`): only a file whose resolved path is directly
  inside one of its tier directories. Nothing outside a tier directory is ever unlinked, whatever
  a catalog row says.
* What happens to a file the store cannot account for (:func:`quarantine`): it is moved into
  ``quarantine/`` inside its tier directory, never deleted.
* Modes: tier directories ``0700``, block files and the catalog ``0600``: the kernel's rule for
  every private file (:mod:`vramancer.files`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from vramancer.errors import DataDirInUse, disk_full_error, is_disk_full
from vramancer.files import FILE_MODE, private_dir

log = logging.getLogger(__name__)

#: Name of the directory, inside each tier directory, that holds quarantined files.
QUARANTINE_DIR = "quarantine"


@contextlib.contextmanager
def full_disk_as(where: str) -> Iterator[None]:
    """Turn a full-disk error inside the block into :class:`InsufficientStorage`."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, where) from exc
        raise


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, resolved, is a direct child of ``root`` (resolved)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return False
    return resolved.parent == root.resolve() and not path.is_symlink()


def unlink_inside(path: Path, root: Path) -> bool:
    """Unlink ``path`` only if it is a file directly inside ``root``; returns whether it was
    removed. A path outside (a catalog row edited to name another file, a symlink) is refused
    with a log line and left alone."""
    if not inside(path, root):
        log.error("refusing to remove %s: it is not a block file of %s", path, root)
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def quarantine(path: Path, root: Path, reason: str) -> Path | None:
    """Move ``path`` (a file directly inside ``root``) into ``root/quarantine/``; returns the
    new path, or None when it could not be moved (it is then left where it is)."""
    if not inside(path, root):
        log.error("not quarantining %s: it is not inside %s", path, root)
        return None
    target_dir = private_dir(root / QUARANTINE_DIR)
    target = target_dir / path.name
    count = 0
    while target.exists():
        count += 1
        target = target_dir / f"{path.name}.{count}"
    try:
        os.replace(path, target)
    except OSError as exc:
        log.error("could not quarantine %s (%s): %s", path, reason, exc)
        return None
    log.warning("quarantined %s: %s (moved to %s)", path.name, reason, target)
    return target


def in_use_message(data_dir: Path) -> str:
    return (
        f"another VRAMancer process is using the data directory {data_dir} (it holds "
        f"{DataDirLock.NAME}); stop it first, or give this one its own data directory "
        "(VRM_DATA_DIR): two daemons on one directory would take each other's block files for "
        "strays"
    )


class DataDirLock:
    """An advisory lock (``<data_dir>/memory.lock``, ``flock``) held while a store has the data
    directory open, so ``vramancer memory recover`` does not rebuild under a running daemon."""

    NAME = "memory.lock"

    def __init__(self, fd: int | None, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def try_acquire(cls, data_dir: Path) -> DataDirLock | None:
        """The lock, or None when another process holds it."""
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / cls.NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return cls(fd, path)

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """The lock; ``DataDirInUse`` when another process (or another store of this one) holds
        it: a second store would reconcile, move and remove the first one's files."""
        found = cls.try_acquire(data_dir)
        if found is None:
            raise DataDirInUse(in_use_message(data_dir), path=str(data_dir))
        return found

    @classmethod
    def check_free(cls, data_dir: Path) -> None:
        """Raise ``DataDirInUse`` now if the data directory is held (an early, clean refusal
        before a server starts; :meth:`acquire` refuses again, race-free, at open)."""
        if not (data_dir / cls.NAME).exists():
            return
        found = cls.try_acquire(data_dir)
        if found is None:
            raise DataDirInUse(in_use_message(data_dir), path=str(data_dir))
        found.release()

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
