"""python-blosc2 beside VRAMancer's own compression, on the same fp16 / bf16 / int8 blocks.

``python -m bench.memory.blosc2_compare [--runs 5] [--block-mib 16] [--store] [--json]``

Blocks: ``--block-mib`` MiB cut from the MiniLM weights of ``bench.memory.compression``
(fp32 converted to bf16 and fp16; int8: per-tensor symmetric quantisation of the same values)
and seeded random bf16 (σ = 0.02). Each block is compressed and decompressed on ONE thread by:

* ``ours``: ``AdaptiveCompression.encode_with`` (byte-plane shuffle in numpy, 2 MiB chunks, one
  zstandard / lz4 frame per plane) and ``AdaptiveCompression.decompress``;
* ``blosc2``: ``blosc2.compress2`` / ``blosc2.decompress2`` with the same codec and level, its
  own SIMD shuffle (``SHUFFLE``) or ``BITSHUFFLE``, ``nthreads=1``.

Per option, medians of ``--runs`` runs interleaved round-robin (the machine's noise hits every
option alike): ``ratio`` (raw / stored), ``c_mb_cpu_s`` and ``d_mb_cpu_s`` (raw MB, 10^6 bytes,
per CPU-second of compression / decompression, ``time.process_time``). Every round trip is
checked byte-identical.

``--store``: the same blocks moved through a real ``TieredStore`` (fsync on, SQLite catalog,
checksummed block files, the store's default threads) whose ``AdaptiveCompression`` may use
``ours`` (zstd, lz4, gzip), ``blosc2`` (b2zstd, b2lz4, b2zstdbs) or ``both`` (the default
list). Legs, interleaved per run: ``L4->L5`` / ``L5->L4`` (compressed when it pays) and
``L4->L6`` / ``L6->L4`` (always compressed). Per leg, the median MB/s (wall clock, 10^6 bytes
of raw data per second) and MB per CPU-second of the whole process (its compression threads
and blosc2's included), the codec the choice took and the stored ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import blosc2
import numpy as np

from bench.memory.common import open_store
from bench.memory.compression import MIB, minilm_path, read_safetensors, to_bf16
from vramancer.clock import SystemClock
from vramancer.memory.compression import (
    AdaptiveCompression,
    Candidate,
    Codec,
    CompressionSettings,
)
from vramancer.memory.settings import MemorySettings


@dataclass(frozen=True, slots=True)
class Block:
    name: str
    data: bytes
    itemsize: int


@dataclass(slots=True)
class Row:
    block: str
    option: str
    ratio: float
    c_mb_cpu_s: float
    d_mb_cpu_s: float


def int8_quantised(fp32: np.ndarray[Any, Any]) -> bytes:
    """Symmetric int8 quantisation with one scale per 64 Ki values (like a per-tensor scale)."""
    out = np.empty(fp32.shape, dtype=np.int8)
    step = 64 * 1024
    for start in range(0, fp32.size, step):
        part = fp32[start : start + step]
        scale = float(np.abs(part).max()) / 127 or 1.0
        out[start : start + step] = np.clip(np.rint(part / scale), -127, 127).astype(np.int8)
    return out.tobytes()


def blocks(block_bytes: int) -> list[Block]:
    _, by_dtype = read_safetensors(minilm_path())
    fp32 = np.frombuffer(by_dtype["F32"], dtype=np.float32)
    rng = np.random.default_rng(2026)
    random_bf16 = to_bf16(rng.standard_normal(block_bytes // 2).astype(np.float32) * 0.02)

    def cut(data: bytes) -> bytes:
        return data[:block_bytes]

    return [
        Block("minilm-bf16", cut(to_bf16(fp32).tobytes()), 2),
        Block("minilm-fp16", cut(fp32.astype(np.float16).tobytes()), 2),
        Block("minilm-int8", cut(int8_quantised(fp32)), 1),
        Block("random-bf16", cut(random_bf16.tobytes()), 2),
    ]


Codec3 = tuple[Callable[[bytes], Any], Callable[[Any], bytes], Callable[[Any], int]]


def ours(manager: AdaptiveCompression, codec: Codec, level: int, itemsize: int) -> Codec3:
    candidate = Candidate(codec, level, itemsize)
    return (
        lambda data: manager.encode_with(data, candidate),
        manager.decompress,
        lambda block: block.stored_size,
    )


def with_blosc2(codec: blosc2.Codec, level: int, itemsize: int, filt: blosc2.Filter) -> Codec3:
    cparams = {
        "codec": codec,
        "clevel": level,
        "typesize": itemsize,
        "filters": [filt],
        "filters_meta": [0],
        "nthreads": 1,
    }
    dparams = {"nthreads": 1}
    return (
        lambda data: blosc2.compress2(data, **cparams),
        lambda out: bytes(blosc2.decompress2(out, **dparams)),
        len,
    )


def options(manager: AdaptiveCompression, itemsize: int) -> dict[str, Codec3]:
    shuf = blosc2.Filter.SHUFFLE if itemsize > 1 else blosc2.Filter.NOFILTER
    table = {
        "ours zstd-1": ours(manager, Codec.ZSTD, 1, itemsize),
        "blosc2 zstd clevel 1": with_blosc2(blosc2.Codec.ZSTD, 1, itemsize, shuf),
        "ours zstd-3": ours(manager, Codec.ZSTD, 3, itemsize),
        "blosc2 zstd clevel 3": with_blosc2(blosc2.Codec.ZSTD, 3, itemsize, shuf),
        "ours lz4": ours(manager, Codec.LZ4, 0, itemsize),
        "blosc2 lz4 clevel 5": with_blosc2(blosc2.Codec.LZ4, 5, itemsize, shuf),
    }
    if itemsize > 1:
        table["blosc2 zstd clevel 1 bitshuffle"] = with_blosc2(
            blosc2.Codec.ZSTD, 1, itemsize, blosc2.Filter.BITSHUFFLE
        )
    return table


def measure(ops: Codec3, data: bytes) -> tuple[float, float, float]:
    compress, decompress, stored = ops
    c0 = time.process_time()
    out = compress(data)
    c1 = time.process_time()
    back = decompress(out)
    c2 = time.process_time()
    if back != data:
        raise AssertionError("round trip changed the data")
    return len(data) / stored(out), c1 - c0, c2 - c1


def run(block_mib: int, runs: int) -> list[Row]:
    manager = AdaptiveCompression(CompressionSettings(threads=1))
    rows: list[Row] = []
    for block in blocks(block_mib * MIB):
        table = options(manager, block.itemsize)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in table}
        for _ in range(runs):
            for name, ops in table.items():
                results[name].append(measure(ops, block.data))
        mb = len(block.data) / 1e6
        for name, res in results.items():
            rows.append(
                Row(
                    block.name,
                    name,
                    round(statistics.median(r[0] for r in res), 4),
                    round(mb / max(1e-9, statistics.median(r[1] for r in res)), 1),
                    round(mb / max(1e-9, statistics.median(r[2] for r in res)), 1),
                )
            )
    manager.close()
    return rows


@dataclass(slots=True)
class StoreRow:
    block: str
    option: str
    leg: str
    codec: str
    ratio: float
    mb_s: float
    mb_cpu_s: float


#: The codec families a store may choose from, per option.
STORE_OPTIONS: dict[str, list[Codec]] = {
    "ours": [Codec.ZSTD, Codec.LZ4, Codec.GZIP],
    "blosc2": [Codec.B2_ZSTD, Codec.B2_LZ4, Codec.B2_ZSTD_BITSHUFFLE],
    "both": CompressionSettings().codecs,
}
LEGS = ("L4->L5", "L5->L4", "L4->L6", "L6->L4")


def _value(block: Block) -> np.ndarray[Any, Any]:
    """The block as the store gets it: an array of its element type (so it knows the size)."""
    return np.frombuffer(block.data, dtype=np.uint16 if block.itemsize == 2 else np.int8)


def _one_store_run(
    store: Any, key: str, times: dict[str, list[tuple[float, float]]]
) -> dict[str, tuple[str, float]]:
    """One L4 -> L5 -> L4 -> L6 -> L4 round, timed per leg (wall clock, CPU time of the whole
    process); per lower tier, the codec it used and the stored ratio the store reports for it
    (read after the move, untimed)."""
    stored: dict[str, tuple[str, float]] = {}
    for leg in LEGS:
        target = leg.split("->")[1]
        move = store.promote if target == "L4" else store.demote
        started, cpu = time.perf_counter(), time.process_time()
        move(key, target)
        times[leg].append((time.perf_counter() - started, time.process_time() - cpu))
        if target != "L4":
            tier = next(t for t in store.stats()["tiers"] if t["name"] == target)
            ratio = float(tier.get("compression_ratio") or 1.0)
            stored[target] = (store.info(key)["compression"], ratio)
    return stored


def store_legs(block_mib: int, runs: int, directory: Path) -> list[StoreRow]:
    """Each block through one store per option, options interleaved run by run."""
    rows: list[StoreRow] = []
    for block in blocks(block_mib * MIB):
        value = _value(block)
        stores: dict[str, Any] = {}
        for name, codecs in STORE_OPTIONS.items():
            settings = MemorySettings(
                tiers={t: {"capacity": 4 * len(block.data)} for t in ("L4", "L5", "L6")},
                compression=CompressionSettings(codecs=codecs),
                spill_on_stop=False,
            )
            stores[name] = open_store(settings, directory / f"{block.name}-{name}", SystemClock())
            stores[name].put("w", value)
        times: dict[str, dict[str, list[tuple[float, float]]]] = {
            name: {leg: [] for leg in LEGS} for name in stores
        }
        ratios: dict[str, dict[str, list[float]]] = {n: {"L5": [], "L6": []} for n in stores}
        used: dict[str, dict[str, str]] = {n: {} for n in stores}
        for _ in range(runs):
            for name, store in stores.items():
                for tier, (codec, ratio) in _one_store_run(store, "w", times[name]).items():
                    used[name][tier] = codec
                    ratios[name][tier].append(ratio)
        mb = len(block.data) / 1e6
        for name, store in stores.items():
            if store.get("w").tobytes() != block.data:
                raise AssertionError(f"{name}: the store changed the block")
            store.close()
            for leg in LEGS:
                tier = leg.split("->")[1 if leg.startswith("L4") else 0]
                wall = statistics.median(t[0] for t in times[name][leg])
                cpu = statistics.median(t[1] for t in times[name][leg])
                rows.append(
                    StoreRow(
                        block.name,
                        name,
                        leg,
                        used[name][tier],
                        round(statistics.median(ratios[name][tier]), 4),
                        round(mb / wall, 1),
                        round(mb / max(cpu, 1e-9), 1),
                    )
                )
    return rows


def store_markdown(rows: list[StoreRow]) -> str:
    lines = [
        "| block | option | leg | codec | ratio | MB/s | MB/CPU-s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.block} | {r.option} | {r.leg} | {r.codec} | {r.ratio:.3f} | {r.mb_s:.0f}"
            f" | {r.mb_cpu_s:.0f} |"
        )
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    lines = [
        "| block | option | ratio | compress MB/CPU-s | decompress MB/CPU-s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.block} | {r.option} | {r.ratio:.3f} | {r.c_mb_cpu_s:.0f} | {r.d_mb_cpu_s:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory.blosc2_compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--block-mib", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--store", action="store_true", help="moves through a real store, ours / blosc2 / both"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the stores' files go")
    args = parser.parse_args(argv)
    if args.runs < 1 or not 1 <= args.block_mib <= 1024:
        parser.error("--runs ≥ 1 and --block-mib in [1, 1024]")
    if args.store:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="vrm-blosc2-") as tmp:
            legs = store_legs(args.block_mib, args.runs, Path(tmp))
        if args.json:
            info = {"machine": platform.machine(), "blosc2": blosc2.__version__}
            print(json.dumps({"info": info, "legs": [asdict(r) for r in legs]}, indent=2))
        else:
            print(store_markdown(legs))
        return 0
    rows = run(args.block_mib, args.runs)
    if args.json:
        info = {"machine": platform.machine(), "blosc2": blosc2.__version__}
        print(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
