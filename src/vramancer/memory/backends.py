"""Tier backends: where a block's bytes really live, and how they get there and back.

* :class:`HostBackend` (L4): the Python object itself — immutable ``bytes``, a read-only numpy
  array, or a CPU torch tensor.
* :class:`FileBackend` (L5, L6): one block file per block (``blockfile.py``), read through a
  memory map; L5 compresses only when the compression manager says it pays, L6 always
  compresses and writes atomically (temporary file, fsync, rename).
* :class:`CudaBackend` (L1, L2) and :class:`PinnedBackend` (L3): flat ``uint8`` torch tensors
  on a CUDA device / in pinned host memory. torch is imported only when these are built.

A block keeps the kind it was put as (:class:`Layout`): ``get`` gives back ``bytes`` for bytes,
a numpy array of the same dtype and shape for arrays, a torch tensor for tensors — byte for
byte what was put, from every tier.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vramancer.errors import InvalidInput
from vramancer.files import fsync_dir, private_dir
from vramancer.memory.blockfile import BlockFile, read_block_file, sync_file, write_block_file
from vramancer.memory.compression import (
    Compressed,
    CompressionManager,
    CorruptBlock,
    NoCompression,
)
from vramancer.memory.storage import full_disk_as, unlink_inside


class DataKind(StrEnum):
    """What a block was put as (and what ``get`` returns)."""

    #: ``bytes`` (also from ``bytearray``/``memoryview``, copied to immutable bytes).
    BYTES = "bytes"
    #: A numpy array (returned read-only).
    NUMPY = "numpy"
    #: A torch tensor (returned on the device of its tier: CUDA for L1/L2, CPU otherwise).
    TORCH = "torch"


@dataclass(frozen=True, slots=True)
class Layout:
    """How to rebuild a block from its bytes."""

    kind: DataKind
    #: numpy dtype string (``<f4``) or torch dtype name (``bfloat16``); ``uint8`` for bytes.
    dtype: str
    shape: tuple[int, ...]
    itemsize: int
    nbytes: int


#: The layout the store keeps for every ``bytes`` block: the size is the block's own
#: (``BlockMeta.size``), so one object serves them all (see :class:`LayoutTable`).
ANY_BYTES = Layout(DataKind.BYTES, "uint8", (), 1, 0)
#: Most distinct array layouts a :class:`LayoutTable` remembers before it starts over.
LAYOUT_TABLE_MAX = 4096


class LayoutTable:
    """One shared :class:`Layout` per distinct array layout, for the store's per-block records.

    A million blocks of a few shapes then hold a few layout objects instead of a million
    (about 120 bytes each with their shape tuples). Every ``bytes`` block shares
    :data:`ANY_BYTES`; :meth:`full` gives back its real layout for the backends. Bounded:
    past ``max_entries`` distinct layouts the table starts over (blocks keep the objects
    they hold, so this only costs sharing, never correctness).
    """

    def __init__(self, max_entries: int = LAYOUT_TABLE_MAX) -> None:
        self.max_entries = max_entries
        self._table: dict[Layout, Layout] = {}

    def __len__(self) -> int:
        return len(self._table)

    def share(self, layout: Layout) -> Layout:
        """The shared layout equal to ``layout`` (:data:`ANY_BYTES` for bytes)."""
        if layout.kind is DataKind.BYTES:
            return ANY_BYTES
        found = self._table.get(layout)
        if found is None:
            if len(self._table) >= self.max_entries:
                self._table.clear()
            self._table[layout] = found = layout
        return found

    @staticmethod
    def full(layout: Layout, size: int) -> Layout:
        """The complete layout of a block of ``size`` bytes kept as ``layout``."""
        if layout is ANY_BYTES:
            return Layout(DataKind.BYTES, "uint8", (size,), 1, size)
        return layout


def _torch() -> Any:
    """The torch module if it is already imported (a tensor can only exist if it is)."""
    return sys.modules.get("torch")


def describe(data: object) -> tuple[Layout, Any]:
    """Check ``data`` and return its layout and the value to store; ``InvalidInput`` if unfit."""
    if isinstance(data, bytes):
        return Layout(DataKind.BYTES, "uint8", (len(data),), 1, len(data)), data
    if isinstance(data, bytearray | memoryview):
        raw = bytes(data)
        return Layout(DataKind.BYTES, "uint8", (len(raw),), 1, len(raw)), raw
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject or data.dtype.names is not None:
            raise InvalidInput(f"numpy dtype {data.dtype} cannot be stored as bytes")
        layout = Layout(
            DataKind.NUMPY,
            data.dtype.str,
            tuple(int(d) for d in data.shape),
            int(data.dtype.itemsize),
            int(data.nbytes),
        )
        return layout, data
    torch = _torch()
    if torch is not None and isinstance(data, torch.Tensor):
        tensor = data.detach()
        layout = Layout(
            DataKind.TORCH,
            str(tensor.dtype).removeprefix("torch."),
            tuple(int(d) for d in tensor.shape),
            int(tensor.element_size()),
            int(tensor.numel() * tensor.element_size()),
        )
        return layout, tensor
    raise InvalidInput(
        f"a block is bytes, a numpy array or a torch tensor, not {type(data).__name__}"
    )


def raw_view(layout: Layout, value: Any) -> memoryview:
    """The bytes of ``value`` without copying when it is in host memory."""
    if layout.kind is DataKind.BYTES:
        return memoryview(value)
    if layout.kind is DataKind.NUMPY:
        arr = np.ascontiguousarray(value).reshape(-1)
        return arr.view(np.uint8).data
    tensor = value if value.device.type == "cpu" else value.cpu()
    flat = tensor.contiguous().reshape(-1).view(_torch().uint8)
    return memoryview(flat.numpy())


def from_raw(layout: Layout, raw: bytes | bytearray) -> Any:
    """Rebuild a block's value from its bytes (``raw`` is not used afterwards by the caller)."""
    if len(raw) != layout.nbytes:
        raise CorruptBlock(f"stored data has {len(raw)} bytes, expected {layout.nbytes}")
    if layout.kind is DataKind.BYTES:
        return raw if isinstance(raw, bytes) else bytes(raw)
    if layout.kind is DataKind.NUMPY:
        arr = np.frombuffer(raw, dtype=np.dtype(layout.dtype)).reshape(layout.shape)
        arr.flags.writeable = False
        return arr
    torch = _import_torch()
    buf = raw if isinstance(raw, bytearray) else bytearray(raw)
    flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(getattr(torch, layout.dtype)).reshape(layout.shape)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # a torch block read back where torch is gone
        raise CorruptBlock(
            "this block holds a torch tensor and torch is not installed "
            "(pip install 'vramancer[torch]')"
        ) from exc
    return torch


class TierBackend(Protocol):
    """Holds the data of the blocks of one tier. ``handle`` is the backend's own token."""

    def write(
        self,
        block_id: str,
        layout: Layout,
        value: Any,
        *,
        owned: bool,
        hint: str | None,
        record: Mapping[str, Any] | None = None,
        durable: bool = False,
        deferred: bool = False,
    ) -> Any:
        """Store a copy of ``value`` (``owned``: the caller gives it away, no copy needed).

        ``record``: what a block file says about its block (file tiers); ``durable``: return
        only once the copy survives a crash (file tiers: file and directory fsynced).
        ``deferred`` (file tiers): the caller makes the file durable later, with the other
        files of a batch (``FileBackend.sync_batch``)."""
        ...

    def read(self, handle: Any, layout: Layout, block_id: str) -> Any:
        """The block's value, in its kind; raises ``CorruptBlock`` if stored bytes are bad."""
        ...

    def free(self, handle: Any) -> None: ...

    def stored_bytes(self, handle: Any) -> int:
        """Bytes the block takes in this tier (compressed size for files)."""
        ...

    def codec(self, handle: Any) -> str: ...


class HostBackend:
    """L4: the value itself, immutable or read-only, in pageable host memory."""

    def write(
        self,
        block_id: str,
        layout: Layout,
        value: Any,
        *,
        owned: bool,
        hint: str | None,
        record: Mapping[str, Any] | None = None,
        durable: bool = False,
        deferred: bool = False,
    ) -> Any:
        if layout.kind is DataKind.BYTES:
            return value if isinstance(value, bytes) else bytes(value)
        if layout.kind is DataKind.NUMPY:
            if owned and not value.flags.writeable:
                return value
            arr = np.array(value, copy=True, order="C")
            arr.flags.writeable = False
            return arr
        if owned and value.device.type == "cpu" and not value.is_pinned():
            return value
        return value.detach().to("cpu", copy=True).contiguous()

    def read(self, handle: Any, layout: Layout, block_id: str) -> Any:
        if layout.kind is DataKind.NUMPY:
            return handle.view()
        return handle

    def free(self, handle: Any) -> None:
        return None

    def stored_bytes(self, handle: Any) -> int:
        if isinstance(handle, bytes):
            return len(handle)
        if isinstance(handle, np.ndarray):
            return int(handle.nbytes)
        return int(handle.numel() * handle.element_size())

    def codec(self, handle: Any) -> str:
        return "none"


@dataclass(frozen=True, slots=True)
class FileHandle:
    """A block file and what it holds."""

    path: Path
    codec: str
    stored_size: int


class FileBackend:
    """L5 / L6: one block file per block in ``directory``.

    ``always_compress`` (L6): the manager is asked with ``force=True``; otherwise (L5) the
    manager decides whether compression pays. ``atomic`` (L6): temp file, fsync, rename.
    """

    def __init__(
        self,
        directory: Path,
        *,
        compression: CompressionManager,
        decoder: CompressionManager,
        always_compress: bool,
        atomic: bool,
        fsync: bool,
    ) -> None:
        self.directory = directory
        self.compression = compression
        self.decoder = decoder
        self.always_compress = always_compress
        self.atomic = atomic
        self.fsync = fsync
        private_dir(directory)

    def new_path(self, block_id: str) -> Path:
        """A fresh file name per stored version, so no two versions ever share a file."""
        digest = hashlib.sha1(block_id.encode(), usedforsecurity=False).hexdigest()[:16]
        return self.directory / f"{digest}-{secrets.token_hex(4)}.blk"

    def write(
        self,
        block_id: str,
        layout: Layout,
        value: Any,
        *,
        owned: bool,
        hint: str | None,
        record: Mapping[str, Any] | None = None,
        durable: bool = False,
        deferred: bool = False,
    ) -> FileHandle:
        raw = raw_view(layout, value)
        payload: bytes | memoryview = raw
        codec, itemsize = "none", 1
        if self.always_compress or not isinstance(self.compression, NoCompression):
            # bytes go in as the bytes object itself, so a manager that stores them as they
            # are can hand the same object back instead of copying it
            source = value if isinstance(value, bytes) else raw
            packed = self.compression.compress(
                source, hint, itemsize=layout.itemsize, force=self.always_compress
            )
            if packed.codec != "none" or packed.itemsize != 1:
                payload, codec, itemsize = packed.payload, packed.codec, packed.itemsize
        path = self.new_path(block_id)
        with full_disk_as(f"block {block_id!r} in {self.directory}"):
            size = write_block_file(
                path,
                payload,
                codec=codec,
                raw_size=layout.nbytes,
                itemsize=itemsize,
                fsync=self.fsync or durable,
                atomic=self.atomic,
                record=record,
                sync_dir=True,
                deferred=deferred,
            )
        return FileHandle(path, codec, size)

    def sync_batch(self, handles: Sequence[FileHandle], *, durable: bool = False) -> None:
        """Make the files written ``deferred`` durable (with ``fsync`` on, or ``durable``):
        each file's data (atomic files were fsynced before their rename), then this tier's
        directory once, so their names are."""
        if not (self.fsync or durable):
            return
        with full_disk_as(f"a batch of block files in {self.directory}"):
            if not self.atomic:
                for handle in handles:
                    sync_file(handle.path)
            fsync_dir(self.directory)

    def read(self, handle: FileHandle, layout: Layout, block_id: str) -> Any:
        what = f"block {block_id!r}"
        wants_buffer = layout.kind is DataKind.TORCH and handle.codec == "none"
        stored = read_block_file(handle.path, what, writable=wants_buffer)
        raw = self._decode(stored, what)
        try:
            return from_raw(layout, raw)
        except CorruptBlock as exc:
            raise CorruptBlock(f"{what}: {exc.message}") from None

    def _decode(self, stored: BlockFile, what: str) -> bytes | bytearray:
        if stored.codec == "none" and stored.itemsize == 1:
            return stored.payload
        block = Compressed(stored.codec, bytes(stored.payload), stored.raw_size, stored.itemsize)
        try:
            return self.decoder.decompress(block, what=what)
        except CorruptBlock:
            raise
        except Exception as exc:  # a codec library's own error on damaged input
            raise CorruptBlock(f"{what}: {stored.codec} payload cannot be decoded: {exc}") from None

    def free(self, handle: FileHandle) -> None:
        """Unlink the block file (only ever a file directly inside this tier's directory)."""
        unlink_inside(handle.path, self.directory)

    def stored_bytes(self, handle: FileHandle) -> int:
        return handle.stored_size

    def codec(self, handle: FileHandle) -> str:
        return handle.codec


def _as_u8_tensor(layout: Layout, value: Any) -> Any:
    """A flat uint8 tensor over the block's bytes (no copy for host data)."""
    torch = _import_torch()
    if layout.kind is DataKind.TORCH:
        return value.contiguous().reshape(-1).view(torch.uint8)
    with warnings.catch_warnings():  # read-only buffers: only read from here
        warnings.simplefilter("ignore")
        return torch.frombuffer(raw_view(layout, value), dtype=torch.uint8)


def _from_u8_tensor(layout: Layout, flat: Any) -> Any:
    """The block's value from a flat uint8 tensor (torch: a view on the same memory)."""
    torch = _import_torch()
    if layout.kind is DataKind.TORCH:
        return flat.view(getattr(torch, layout.dtype)).reshape(layout.shape)
    host = flat.cpu() if flat.device.type != "cpu" else flat
    raw = host.numpy().tobytes()
    return from_raw(layout, raw)


class CudaBackend:
    """L1 / L2: flat uint8 tensors on CUDA devices (L2 spreads blocks over several GPUs)."""

    def __init__(self, devices: tuple[int, ...]) -> None:
        self.torch = _import_torch()
        self.devices = devices
        self._used = dict.fromkeys(devices, 0)

    def write(
        self,
        block_id: str,
        layout: Layout,
        value: Any,
        *,
        owned: bool,
        hint: str | None,
        record: Mapping[str, Any] | None = None,
        durable: bool = False,
        deferred: bool = False,
    ) -> Any:
        torch = self.torch
        index = min(self.devices, key=lambda d: self._used[d])
        device = torch.device("cuda", index)
        src = _as_u8_tensor(layout, value)
        dst = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=bool(src.device.type == "cpu" and src.is_pinned()))
        torch.cuda.current_stream(device).synchronize()
        self._used[index] += layout.nbytes
        return dst

    def read(self, handle: Any, layout: Layout, block_id: str) -> Any:
        return _from_u8_tensor(layout, handle)

    def free(self, handle: Any) -> None:
        index = handle.device.index
        if index in self._used:
            self._used[index] -= int(handle.numel())

    def stored_bytes(self, handle: Any) -> int:
        return int(handle.numel())

    def codec(self, handle: Any) -> str:
        return "none"


class PinnedBackend:
    """L3: flat uint8 tensors in pinned (page-locked) host memory, the GPU copy staging area."""

    def __init__(self) -> None:
        self.torch = _import_torch()

    def write(
        self,
        block_id: str,
        layout: Layout,
        value: Any,
        *,
        owned: bool,
        hint: str | None,
        record: Mapping[str, Any] | None = None,
        durable: bool = False,
        deferred: bool = False,
    ) -> Any:
        torch = self.torch
        src = _as_u8_tensor(layout, value)
        dst = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=True)
        if src.device.type == "cuda":
            dst.copy_(src, non_blocking=True)
            torch.cuda.current_stream(src.device).synchronize()
        else:
            dst.copy_(src)
        return dst

    def read(self, handle: Any, layout: Layout, block_id: str) -> Any:
        if layout.kind is DataKind.NUMPY:
            arr = np.frombuffer(handle.numpy().tobytes(), dtype=np.dtype(layout.dtype))
            arr = arr.reshape(layout.shape)
            arr.flags.writeable = False
            return arr
        return _from_u8_tensor(layout, handle)

    def free(self, handle: Any) -> None:
        return None

    def stored_bytes(self, handle: Any) -> int:
        return int(handle.numel())

    def codec(self, handle: Any) -> str:
        return "none"
