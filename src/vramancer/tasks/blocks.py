"""The blocks a task names (``"blocks": [...]``), as files in its scratch directory.

Before the task's process starts, each block is read from this node's memory store — which
brings it from a peer over the fastpath when another node holds it — and written to
``<scratch>/blocks/<file name>`` (``VRM_BLOCKS_DIR``). The file name is the block id
percent-encoded (``kv/page/1`` → ``kv%2Fpage%2F1``), so no id can name a path outside that
directory. Reading and writing happen on a thread; a block found nowhere fails the attempt with
the block's name (a retry may find it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import quote

from vramancer.errors import NotFound, VramancerError
from vramancer.files import open_private, private_dir

#: The task's environment variable naming the directory of its blocks.
ENV_BLOCKS_DIR = "VRM_BLOCKS_DIR"


@runtime_checkable
class BlockReader(Protocol):
    """What this needs of the memory store: a block's bytes (fetched from a peer if needed)."""

    def read_bytes(self, block_id: str) -> tuple[bytes, dict[str, object]]: ...


class BlockMissing(Exception):
    """A block of the task could not be brought here; the message names it and why."""


def blocks_dir(scratch: Path) -> Path:
    return scratch / "blocks"


def file_name(block_id: str) -> str:
    """The file a block is written to: its id percent-encoded, never ``.`` or ``..``."""
    name = quote(block_id, safe="")
    return name.replace(".", "%2E") if set(name) == {"."} else name


def _write(reader: BlockReader, block_ids: list[str], directory: Path) -> int:
    private_dir(directory)
    total = 0
    for block_id in block_ids:
        try:
            data, _ = reader.read_bytes(block_id)
        except NotFound:
            raise BlockMissing(f"block {block_id!r} is on no node") from None
        except VramancerError as exc:
            raise BlockMissing(f"block {block_id!r} could not be brought here: {exc}") from None
        with open(open_private(directory / file_name(block_id)), "wb", closefd=True) as out:
            out.write(data)
        total += len(data)
    return total


async def materialize(reader: BlockReader, block_ids: list[str], scratch: Path) -> int:
    """Write ``block_ids`` under ``blocks_dir(scratch)``; the bytes written."""
    return await asyncio.to_thread(_write, reader, block_ids, blocks_dir(scratch))
