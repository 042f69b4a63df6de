"""Private files and directories: the data directory holds task bodies (their ``env``), task
logs and scratch space, stored blocks and their catalog, all the daemon's user's alone.

One rule for every subsystem: directories 0700, files 0600, set explicitly (``chmod`` after
creation) so the result does not depend on the daemon's umask. ``tighten`` fixes what an
earlier version created too open (0755 / 0644); ``fsync_dir`` makes the names created or
removed in a directory durable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents as 0700 directories (existing parents are left
    alone; ``path`` itself is made 0700 even if it existed)."""
    try:  # the common case first: the parent is there, the directory is not
        os.mkdir(path, DIR_MODE)
    except OSError:
        pass
    else:
        os.chmod(path, DIR_MODE)  # what the umask took away
        return path
    missing: list[Path] = []
    here = path
    while not here.exists():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=DIR_MODE)
        os.chmod(folder, DIR_MODE)
    if not missing:
        tighten(path, DIR_MODE)
    return path


def open_private(path: Path, *, append: bool = False) -> int:
    """Open ``path`` for writing as a 0600 file (created if missing); returns the descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def touch_private(path: Path) -> None:
    """Make sure ``path`` exists and is 0600 (before another library creates it more open)."""
    os.close(open_private(path, append=True))


def tighten(path: Path, mode: int) -> bool:
    """Take group and other permissions off ``path`` when this user owns it (a directory or file
    the daemon created); True when it changed. Missing paths and others' files are left."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or not st.st_mode & 0o077:
        return False
    os.chmod(path, mode)
    return True


def tighten_tree(root: Path) -> int:
    """``tighten`` ``root`` and everything under it (directories 0700, files 0600). Walks only
    when ``root`` itself was too open: once fixed, later starts cost one ``stat``."""
    if not tighten(root, DIR_MODE):
        return 0
    fixed = 1
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            fixed += tighten(Path(folder) / name, DIR_MODE)
        for name in files:
            fixed += tighten(Path(folder) / name, FILE_MODE)
    return fixed


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the names created or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the dirty pages, do not wait


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", fn)


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to the device
    now, without waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``): a later fsync then
    waits for less. A hint: nothing happens where it is not available or fails."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
