"""A block as it leaves this node (the fastpath serves it): a region of its block file, sent
without a copy, or its bytes.

``BlockExport`` is either ``file`` (an open descriptor, the payload's offset and length, the
xxh3-64 the file's header holds) — for a block on a disk tier stored uncompressed, whose payload
*is* the block's bytes — or ``data`` with its xxh3-64, for every other block. The descriptor is
opened under the store's lock: the block may move or be deleted afterwards, the open file still
reads the version that was there, whole.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from vramancer.memory.blockfile import checksum, payload_region
from vramancer.memory.compression import CorruptBlock


@dataclass(slots=True)
class BlockExport:
    """One block ready to send: ``fd`` + ``offset``/``length``, or ``data``; ``checksum`` is
    xxh3-64 of the block's bytes. ``close()`` releases the descriptor."""

    length: int
    checksum: int
    data: bytes | None = None
    fd: int | None = None
    offset: int = 0

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def from_bytes(data: bytes) -> BlockExport:
    return BlockExport(length=len(data), checksum=checksum(data), data=data)


def from_file(fd: int, what: str) -> BlockExport | None:
    """The export of an open block file when its payload is the block's raw bytes, else None
    (the descriptor is closed then)."""
    try:
        region = payload_region(fd, what)
    except (OSError, CorruptBlock):
        os.close(fd)
        return None
    if region.codec != "none" or region.itemsize != 1:
        os.close(fd)
        return None
    return BlockExport(length=region.length, checksum=region.checksum, fd=fd, offset=region.offset)
