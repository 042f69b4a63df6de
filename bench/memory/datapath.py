"""Data-path benchmark: moving 16 MiB blocks between L4, L5 and L6.

``python -m bench.memory.datapath [--runs 7] [--mib 16] [--dir DIR] [--json]``

Each leg runs through a real ``TieredStore`` (fsync on, SQLite catalog on, block files with
their checksum) and, in the same run and on the same bytes, its raw baseline:

* ``L4->L5``: ``store.demote(id, "L5")`` vs writing the same bytes to a file + ``fsync``;
* ``L5->L4``: ``store.promote(id, "L4")`` vs reading the same file back (both from the page
  cache: the file was just written);
* ``L4->L6 (zstd)``: ``store.demote(id, "L6")`` (zstd level 1, forced: L6 always compresses)
  vs ``zstandard`` level 1 compressing the same bytes, then writing them + ``fsync``;
* ``L6->L4``: ``store.promote(id, "L4")`` vs reading the compressed file + ``zstandard``
  decompressing it.

The L5 legs use incompressible bytes (so the store stores them raw, as L5 does when compression
does not pay); the L6 legs use fp16 values drawn like weights (N(0, 0.02)). The store is given
the plain zstd-1 manager so both sides do the same compression work; the ratio then measures
the store's own overhead (sampling, checksums, atomic rename, catalog). Medians of ``--runs``
runs, legs interleaved. Target: every leg at ≥ 70 % of its baseline's throughput.

``--batch N`` (default 8; 0: none) adds the batch legs: N blocks demoted to L5 in one call
(``store.demote_many``: each file fsynced, the directory once, one commit of the rows) and the
same N blocks one ``demote`` per block, each against writing the same N files + ``fsync`` each +
one ``fsync`` of their directory; also reported (``ratio_to_one_pass``) against the batch's own
order on plain files: the N files written with writeback started, then fsynced one by one, then
the directory. The four ways alternate, rotated each run.

``--writers`` measures the L5 writer alone (``writer_legs``), in one process: block files
written piece by piece with early writeback, and in one go, against raw write + fsync.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from bench.memory.common import open_store
from vramancer.clock import SystemClock
from vramancer.files import fsync_dir, start_writeback
from vramancer.memory import blockfile
from vramancer.memory.compression import Compressed, Target, decompress_block
from vramancer.memory.settings import MemorySettings
from vramancer.memory.store import TieredStore

MIB = 1024 * 1024
TARGET = 0.70
#: Bytes sampled to decide whether compression pays when not forced (L5).
SAMPLE_BYTES = 256 * 1024
#: Smallest sampled ratio (raw / compressed) that is worth compressing when not forced.
MIN_RATIO = 1.1


class PlainZstd:
    """A compression manager doing exactly the baseline's work: zstd at ``level`` on the whole
    block (forced for L6; for L5 only when a 256 KiB sample shrinks by ``MIN_RATIO``), no
    byte-plane shuffle, no chunks. Decoding is the store's own (``decompress_block``)."""

    def __init__(self, level: int = 1) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level)

    def compress(
        self,
        data: bytes | bytearray | memoryview,
        hint: str | None = None,
        *,
        itemsize: int = 1,
        force: bool = False,
        target: Target | str | None = None,
    ) -> Compressed:
        view = memoryview(data).cast("B")
        if not force and target != "archive":
            sample = view[:SAMPLE_BYTES]
            if sample.nbytes < len(self._compressor.compress(sample)) * MIN_RATIO:
                # bytes in, bytes out: no 16 MiB copy just to say "stored as is"
                raw = data if isinstance(data, bytes) else bytes(view)
                return Compressed("none", raw, view.nbytes)
        return Compressed("zstd", self._compressor.compress(view), view.nbytes)

    def decompress(self, block: Compressed, *, what: str = "block") -> bytes:
        return decompress_block(block, what=what)


def make_store(directory: Path, block_bytes: int, blocks: int = 8) -> TieredStore:
    settings = MemorySettings(
        tiers={
            "L4": {"capacity": blocks * block_bytes},
            "L5": {"capacity": blocks * block_bytes},
            "L6": {"capacity": blocks * block_bytes},
        },
        fsync=True,
        spill_on_stop=False,
    )
    return open_store(settings, directory, SystemClock(), compression=PlainZstd(level=1))


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_fsync(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def read_file(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def run(runs: int, mib: int, directory: Path) -> dict[str, Any]:
    size = mib * MIB
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    weights = (rng.standard_normal(size // 2) * 0.02).astype(np.float16).tobytes()
    store = make_store(directory / "store", size)
    raw_dir = directory / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    zc = zstandard.ZstdCompressor(level=1)
    zd = zstandard.ZstdDecompressor()
    samples: dict[str, dict[str, list[float]]] = {
        leg: {"store": [], "baseline": []} for leg in ("L4->L5", "L5->L4", "L4->L6", "L6->L4")
    }
    store.put("noise", noise)
    store.put("weights", weights)
    packed_size = 0
    for _ in range(runs):
        # L4 -> L5 and back
        samples["L4->L5"]["store"].append(timed(lambda: store.demote("noise", "L5")))
        samples["L4->L5"]["baseline"].append(
            timed(lambda: write_fsync(raw_dir / "noise.bin", noise))
        )
        assert store.info("noise")["compression"] == "none"
        samples["L5->L4"]["store"].append(timed(lambda: store.promote("noise", "L4")))
        samples["L5->L4"]["baseline"].append(timed(lambda: read_file(raw_dir / "noise.bin")))
        # L4 -> L6 (zstd) and back
        samples["L4->L6"]["store"].append(timed(lambda: store.demote("weights", "L6")))

        def baseline_compress() -> None:
            nonlocal packed_size
            packed = zc.compress(weights)
            packed_size = len(packed)
            write_fsync(raw_dir / "weights.zst", packed)

        samples["L4->L6"]["baseline"].append(timed(baseline_compress))
        samples["L6->L4"]["store"].append(timed(lambda: store.promote("weights", "L4")))
        samples["L6->L4"]["baseline"].append(
            timed(lambda: zd.decompress(read_file(raw_dir / "weights.zst")))
        )
        for f in raw_dir.iterdir():
            f.unlink()
    assert store.get("noise") == noise and store.get("weights") == weights
    store.close()
    legs: dict[str, Any] = {}
    for leg, both in samples.items():
        s, b = statistics.median(both["store"]), statistics.median(both["baseline"])
        legs[leg] = {
            "store_mb_s": round(size / s / 1e6, 1),
            "baseline_mb_s": round(size / b / 1e6, 1),
            "ratio": round(b / s, 3),
            "pass": b / s >= TARGET,
        }
    return {
        "block_bytes": size,
        "runs": runs,
        "zstd_ratio_weights": round(len(weights) / packed_size, 3) if packed_size else None,
        "target_ratio": TARGET,
        "legs": legs,
    }


def raw_files(raw_dir: Path, data: list[bytes]) -> None:
    """The batch legs' baseline: each file written + ``fsync``, then the directory."""
    for i, value in enumerate(data):
        write_fsync(raw_dir / f"{i}.bin", value)
    fsync_dir(raw_dir)


def raw_files_one_pass(raw_dir: Path, data: list[bytes]) -> None:
    """What a batch does, on plain files: each file written with writeback started, then
    each fsynced, then the directory."""
    for i, value in enumerate(data):
        with open(raw_dir / f"{i}.bin", "wb") as fh:
            fh.write(value)
            fh.flush()
            start_writeback(fh.fileno(), 0, 0)
    for i in range(len(data)):
        blockfile.sync_file(raw_dir / f"{i}.bin")
    fsync_dir(raw_dir)


def batch_legs(runs: int, mib: int, count: int, directory: Path) -> dict[str, Any]:
    """``count`` blocks L4 -> L5 in one ``demote_many`` call and one ``demote`` per block,
    against raw: the same ``count`` files written + ``fsync`` each, then one ``fsync`` of
    their directory. The blocks are put back into L4 (untimed) before each store run."""
    size = mib * MIB
    rng = np.random.default_rng(2)
    data = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(count)]
    ids = [f"noise/{i}" for i in range(count)]
    store = make_store(directory / "store", size, blocks=4 * count)
    raw_dir = directory / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)

    def per_block() -> None:
        for block_id in ids:
            store.demote(block_id, "L5")

    ways: dict[str, Callable[[], Any]] = {
        "raw": lambda: raw_files(raw_dir, data),
        "raw, one pass": lambda: raw_files_one_pass(raw_dir, data),
        "batch": lambda: store.demote_many(ids, "L5"),
        "per block": per_block,
    }
    names = list(ways)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if not name.startswith("raw"):
                for block_id, value in zip(ids, data, strict=True):  # back into L4
                    if block_id in store:
                        store.delete(block_id)
                    store.put(block_id, value)
            times[name].append(timed(ways[name]))
            for f in raw_dir.iterdir():
                f.unlink()
    assert all(store.locate(i) == "L5" for i in ids)
    store.close()
    return batch_summary(times, count * size, f"L4->L5 x{count}")


def batch_summary(times: dict[str, list[float]], nbytes: int, leg: str) -> dict[str, Any]:
    base = statistics.median(times["raw"])
    one_pass = statistics.median(times["raw, one pass"])
    legs: dict[str, Any] = {}
    for name in ("batch", "per block"):
        t = statistics.median(times[name])
        legs[f"{leg}, {name}"] = {
            "store_mb_s": round(nbytes / t / 1e6, 1),
            "baseline_mb_s": round(nbytes / base / 1e6, 1),
            "ratio": round(base / t, 3),
            "pass": base / t >= TARGET,
            "ratio_to_one_pass": round(one_pass / t, 3),
        }
    return legs


def writer_legs(runs: int, mib: int, directory: Path) -> dict[str, Any]:
    """The L5 writer alone, in one process, against a raw write + fsync of the same bytes:
    ``pieces`` is ``write_block_file`` as the store calls it (checksummed piece by piece as it
    writes, writeback started per piece), ``one-go`` the same with one piece (checksum, one
    write, fdatasync: how block files were written before). Round-robin, rotated each run."""
    size = mib * MIB
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    directory.mkdir(parents=True, exist_ok=True)
    counter = iter(range(1 << 30))

    def block_file(piece: int) -> None:
        saved = blockfile.WRITE_PIECE
        blockfile.WRITE_PIECE = piece
        try:
            blockfile.write_block_file(
                directory / f"{next(counter)}.blk",
                data,
                codec="none",
                raw_size=size,
                record={"id": "bench"},
                sync_dir=True,
            )
        finally:
            blockfile.WRITE_PIECE = saved

    ways: dict[str, Callable[[], None]] = {
        "raw write+fsync": lambda: write_fsync(directory / f"{next(counter)}.raw", data),
        "one-go": lambda: block_file(1 << 62),
        "pieces": lambda: block_file(blockfile.WRITE_PIECE),
    }
    names = list(ways)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(ways[name]))
        for f in directory.iterdir():
            f.unlink()
    raw = statistics.median(times["raw write+fsync"])
    return {
        name: {
            "mb_s": round(size / statistics.median(t) / 1e6, 1),
            "ratio_to_raw": round(raw / statistics.median(t), 3),
        }
        for name, t in times.items()
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"Data path, {result['block_bytes'] // MIB} MiB blocks, median of {result['runs']} runs "
        f"(zstd-1 ratio on the fp16 block: {result['zstd_ratio_weights']}x)",
        "",
        "| leg | store MB/s | baseline MB/s | store / baseline | ≥ 70 % |",
        "|---|---:|---:|---:|---|",
    ]
    for leg, r in result["legs"].items():
        ok = "yes" if r["pass"] else "NO"
        lines.append(
            f"| {leg} | {r['store_mb_s']} | {r['baseline_mb_s']} | {r['ratio']:.0%} | {ok} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=None, help="where files go (a real disk)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--batch", type=int, default=8, help="blocks per batch in the batch legs (0: none)"
    )
    parser.add_argument(
        "--writers",
        action="store_true",
        help="only the L5 block-file writer (pieces vs one go) against raw write+fsync",
    )
    args = parser.parse_args(argv)
    if args.writers:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="vrm-datapath-") as tmp:
            print(json.dumps(writer_legs(args.runs, args.mib, Path(tmp)), indent=2))
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="vrm-datapath-") as tmp:
        result = run(args.runs, args.mib, Path(tmp))
        if args.batch > 0:
            result["batch"] = args.batch
            result["legs"].update(batch_legs(args.runs, args.mib, args.batch, Path(tmp) / "b"))
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0 if all(r["pass"] for r in result["legs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
