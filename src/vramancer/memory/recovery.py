"""Reconciling the catalog with the block files at start, and rebuilding it from them.

The block files are the truth about which blocks exist; the catalog (``catalog.py``) is an index
that also keeps what files cannot (pinned, hotness). At every start :func:`reconcile`:

1. moves unreadable rows into the catalog's ``quarantine`` table;
2. keeps the rows whose file is in their tier directory (a row's ``file`` is read as a name in
   that directory: an absolute path from an older catalog, or a moved or copied data directory,
   resolves to the file beside it, never to a file elsewhere); a row whose file name does not
   belong to its block id is quarantined;
3. adopts every block file no row claims, from the record in its header (``blockfile.py``): a
   deleted, truncated, damaged or copied catalog loses nothing;
4. moves into ``quarantine/`` (never deletes) the files it cannot account for: unreadable
   headers, version 1 files without their row, other copies of a block that has one;
5. drops the rows whose file is gone (logged and reported as lost), except in a tier whose
   directory is empty (an unmounted disk, a moved path): those rows stay, unloaded, until the
   files are back (reported as left).

Only interrupted temporary files (``.*.tmp``, never a committed block) are removed. Every unlink
is checked to be inside a tier directory (``storage.unlink_inside``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramancer.errors import Conflict
from vramancer.memory.blockfile import read_block_header
from vramancer.memory.catalog import BlockRow, Catalog, read_rows
from vramancer.memory.compression import CorruptBlock
from vramancer.memory.storage import DataDirLock, quarantine, unlink_inside

log = logging.getLogger(__name__)

#: Block file names: 16 hex digits of the id's SHA-1, a dash, 8 random hex digits.
FILE_NAME_RE = re.compile(r"([0-9a-f]{16})-[0-9a-f]{8}\.blk")
_KINDS = frozenset({"bytes", "numpy", "torch"})
#: ``progress(done, total)`` while scanning block files.
Progress = Callable[[int, int], None]


def id_digest(block_id: str) -> str:
    """The 16 hex digits of a block id that start its file names."""
    return hashlib.sha1(block_id.encode(), usedforsecurity=False).hexdigest()[:16]


def belongs(name: str, block_id: str) -> bool:
    """Whether ``name`` is a block file name of ``block_id``."""
    found = FILE_NAME_RE.fullmatch(name)
    return found is not None and found.group(1) == id_digest(block_id)


@dataclass(slots=True)
class Quarantined:
    """One thing set aside: ``what`` is ``"file"`` or ``"row"``."""

    what: str
    tier: str
    name: str
    reason: str


@dataclass(slots=True)
class Reconciled:
    """What :func:`reconcile` found: the rows to load, and what it did."""

    rows: list[BlockRow] = field(default_factory=list)
    adopted: int = 0
    lost: list[str] = field(default_factory=list)
    #: Rows kept, not loaded: their tier's directory held none of its blocks' files.
    left: list[str] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    temporary_removed: int = 0


@dataclass(slots=True)
class _Candidate:
    row: BlockRow
    written: int


def reconcile(
    catalog: Catalog, tiers: Mapping[str, Path], *, progress: Progress | None = None
) -> Reconciled:
    """Bring ``catalog`` in line with the block files of ``tiers`` (name -> directory)."""
    out = Reconciled()
    good, bad = catalog.load()
    for unreadable in bad:
        catalog.quarantine(unreadable, unreadable.reason)
        out.quarantined.append(Quarantined("row", "", unreadable.id or "?", unreadable.reason))
    roots = {name: path.resolve() for name, path in tiers.items()}
    claimed, missing = _claims(catalog, good, roots, out)
    empty = {tier for tier, root in roots.items() if not _listing(root, dirs=True)}
    found = _scan(roots, claimed, out, progress)
    live = {row.id for row in claimed.values()}
    adopted = _choose(found, live, roots, out)
    kept = {row.id for row in adopted}
    for row in _not_in_empty_tiers(missing, empty, out):
        catalog.delete(row.id, durable=False)
        if row.id not in kept:
            out.lost.append(row.id)
    catalog.upsert_many(adopted)
    out.adopted = len(adopted)
    out.rows = [*claimed.values(), *adopted]
    return out


def _not_in_empty_tiers(
    missing: list[BlockRow], empty: set[str], out: Reconciled
) -> list[BlockRow]:
    """The rows whose file is gone that may be dropped. A tier directory with nothing in it at
    all (a disk not mounted yet, a moved or mistyped path) says nothing about its blocks: their
    rows stay in the catalog, unloaded, until the files are back, for a block file of the old
    format has no record to rebuild its row from."""
    droppable = []
    left: dict[str, int] = {}
    for row in missing:
        if row.tier in empty:
            left[row.tier] = left.get(row.tier, 0) + 1
            out.left.append(row.id)
        else:
            droppable.append(row)
    for tier, count in sorted(left.items()):
        log.error(
            "tier %s: its directory is empty but the catalog lists %d block(s) there; they are "
            "left in the catalog, not loaded (is the disk mounted, the path right?)",
            tier,
            count,
        )
    return droppable


def _claims(
    catalog: Catalog, rows: list[BlockRow], roots: Mapping[str, Path], out: Reconciled
) -> tuple[dict[str, BlockRow], list[BlockRow]]:
    """The rows whose file is there (by ``"<tier>/<file name>"``) and those whose file is not."""
    claimed: dict[str, BlockRow] = {}
    missing: list[BlockRow] = []
    for row in rows:
        root = roots.get(row.tier)
        if root is None:
            log.warning("block %r is in %s, which is absent now; left on disk", row.id, row.tier)
            continue
        name = Path(row.file).name
        if not belongs(name, row.id):
            reason = f"its file name {row.file!r} is not a file of block {row.id!r}"
            catalog.quarantine(row, reason)
            out.quarantined.append(Quarantined("row", row.tier, row.id, reason))
            continue
        if not (root / name).is_file():
            missing.append(row)
            continue
        if row.file != name:  # an absolute path of an older catalog
            row = dataclasses.replace(row, file=name)
            catalog.upsert(row, durable=False)
        claimed[f"{row.tier}/{name}"] = row
    return claimed, missing


def _scan(
    roots: Mapping[str, Path],
    claimed: Mapping[str, BlockRow],
    out: Reconciled,
    progress: Progress | None,
) -> dict[str, list[tuple[_Candidate, Path, str]]]:
    """Read the records of the unclaimed block files; returns candidates by block id."""
    entries = [(tier, entry) for tier, root in roots.items() for entry in _listing(root)]
    found: dict[str, list[tuple[_Candidate, Path, str]]] = {}
    for done, (tier, path) in enumerate(entries, 1):
        if progress is not None:
            progress(done, len(entries))
        root = roots[tier]
        name = path.name
        if name.startswith(".") and name.endswith(".tmp"):
            out.temporary_removed += int(unlink_inside(path, root))
            continue
        if not name.endswith(".blk") or f"{tier}/{name}" in claimed:
            continue
        try:
            candidate = _candidate(path, tier)
        except (CorruptBlock, OSError, ValueError, TypeError, KeyError) as exc:
            reason = getattr(exc, "message", None) or str(exc)
            _set_aside(path, root, tier, reason, out)
            continue
        found.setdefault(candidate.row.id, []).append((candidate, path, tier))
    return found


def _listing(root: Path, *, dirs: bool = False) -> list[Path]:
    """The files in ``root`` (and its directories too with ``dirs``), sorted."""
    try:
        return sorted(p for p in root.iterdir() if dirs or not p.is_dir())
    except FileNotFoundError:
        return []


def _choose(
    found: Mapping[str, list[tuple[_Candidate, Path, str]]],
    live: set[str],
    roots: Mapping[str, Path],
    out: Reconciled,
) -> list[BlockRow]:
    """One copy per block id: a row's own file wins, else the newest; the rest is set aside."""
    adopted: list[BlockRow] = []
    for block_id, copies in found.items():
        copies = sorted(copies, key=lambda c: (c[0].written, c[1].name), reverse=True)
        keep = None if block_id in live else copies[0]
        if keep is not None:
            adopted.append(keep[0].row)
        for candidate, path, tier in copies:
            if candidate is not (keep[0] if keep else None):
                _set_aside(path, roots[tier], tier, f"another copy of block {block_id!r}", out)
    return adopted


def _set_aside(path: Path, root: Path, tier: str, reason: str, out: Reconciled) -> None:
    if quarantine(path, root, reason) is not None:
        out.quarantined.append(Quarantined("file", tier, path.name, reason))


def _candidate(path: Path, tier: str) -> _Candidate:
    """A catalog row rebuilt from a block file's record (``CorruptBlock``/``ValueError`` if it
    cannot be)."""
    header = read_block_header(path)
    record = header.record
    if record is None:
        raise CorruptBlock("a version 1 block file without its catalog row (no record)")
    block_id = _text(record, "id")
    if not belongs(path.name, block_id):
        raise ValueError(f"its record names block {block_id!r}, not the block of this file")
    size = _count(record, "size")
    if size != header.raw_size or size <= 0:
        raise ValueError("its record's size does not match its header")
    kind = _text(record, "kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    shape = record.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError("its record's shape is not a list of sizes")
    hint = record.get("hint")
    row = BlockRow(
        id=block_id,
        size=size,
        tier=tier,
        priority=_count(record, "priority"),
        pinned=False,
        hint=hint if isinstance(hint, str) else None,
        kind=kind,
        dtype=_text(record, "dtype"),
        shape=tuple(shape),
        itemsize=_count(record, "itemsize"),
        file=path.name,
        codec=header.codec,
        stored_size=header.file_size,
        hits=0.0,
        created=float(record.get("created", 0.0)),
        durable=record.get("durable") is True,
    )
    return _Candidate(row, _count(record, "written"))


def _text(record: Mapping[str, Any], key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"its record's {key} is not text")
    return value


def _count(record: Mapping[str, Any], key: str) -> int:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"its record's {key} is not a count")
    return value


def rebuild(
    data_dir: Path,
    tiers: Mapping[str, Path],
    *,
    fsync: bool = True,
    progress: Progress | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """``vramancer memory recover``: move ``<data_dir>/memory.sqlite`` aside (never deleted)
    and rebuild it from the block files of ``tiers``, carrying over what the old catalog still
    says where it can be read (pinned flags, hotness, rows of version 1 files).

    Raises ``Conflict`` while a store has the data directory open. Returns a summary."""
    lock = DataDirLock.try_acquire(data_dir)
    if lock is None:
        raise Conflict(
            f"a VRAMancer process is using {data_dir} (it holds {DataDirLock.NAME}); stop it "
            "before recovering its catalog"
        )
    try:
        db = data_dir / "memory.sqlite"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        aside = _move_aside(db, stamp)
        carried = read_rows(aside[0]) if aside else []
        catalog = Catalog(db, fsync=fsync)
        try:
            catalog.upsert_many(carried)
            found = reconcile(catalog, tiers, progress=progress)
        finally:
            catalog.close()
    finally:
        lock.release()
    return {
        "data_dir": str(data_dir),
        "catalog": str(db),
        "moved_aside": [str(p) for p in aside],
        "carried_rows": len(carried),
        "blocks": len(found.rows),
        "bytes": sum(r.size for r in found.rows),
        "adopted": found.adopted,
        "lost": found.lost,
        "left": found.left,
        "quarantined": [dataclasses.asdict(q) for q in found.quarantined],
        "temporary_removed": found.temporary_removed,
    }


def _move_aside(db: Path, stamp: str) -> list[Path]:
    """Rename the database and its WAL/SHM files to ``memory.sqlite.aside-<stamp>[-wal]``."""
    moved: list[Path] = []
    base = db.with_name(f"{db.name}.aside-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = db.with_name(db.name + suffix)
        if source.exists():
            target = base.with_name(base.name + suffix)
            os.replace(source, target)
            moved.append(target)
    if moved and moved[0] != base:  # only a WAL or SHM file was left: nothing to read
        moved.insert(0, base)
    return moved
