"""The optional blosc2 codecs: blocks round-trip through the store bit-exactly, their block file
names the codec, a missing python-blosc2 is reported by name, and the adaptive choice offers
blosc2 only where it can be imported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.unit.memory.store_support import StoreKit
from tests.unit.memory.test_compression import StepTimer, weights
from vramancer.errors import ConfigError
from vramancer.memory import blosc2_codec
from vramancer.memory.blockfile import read_block_file
from vramancer.memory.compression import (
    AdaptiveCompression,
    Candidate,
    Codec,
    CodecUnavailable,
    Compressed,
    CompressionSettings,
    CorruptBlock,
    Target,
    Trial,
    candidates,
    choose,
)

pytest.importorskip("blosc2")

BLOSC2 = [Codec.B2_ZSTD, Codec.B2_LZ4, Codec.B2_ZSTD_BITSHUFFLE]
CHUNK = 64 * 1024


def manager(*codecs: Codec, **overrides: object) -> AdaptiveCompression:
    settings = CompressionSettings.model_validate(
        {"codecs": list(codecs), "chunk_size": CHUNK, **overrides}
    )
    return AdaptiveCompression(settings)


def bf16_array(n: int) -> np.ndarray:
    return weights(n, "bf16")


# the bit shuffle is tried only on blocks with an element size
@pytest.mark.parametrize(
    ("codec", "value"),
    [(c, v) for c in BLOSC2 for v in ("bf16", "bytes") if (c, v) != (BLOSC2[2], "bytes")],
)
def test_each_blosc2_codec_round_trips_through_the_store(
    tmp_path: Path, codec: Codec, value: str
) -> None:
    data: np.ndarray | bytes = bf16_array(100_000)  # several chunks, 16-bit elements
    if value == "bytes":
        data = bytes(np.repeat(np.arange(50_000, dtype=np.uint8) % 7, 3))  # no element size
    kit = StoreKit(tmp_path / "data", compression=manager(codec))
    store = kit.store
    store.put("w", data)
    assert store.demote("w", "L6") == "L6"
    assert store.info("w")["compression"] == codec.value
    path = next((kit.data_dir / "l6").glob("*.blk"))
    stored = read_block_file(path, "w")
    assert stored.codec == codec.value and stored.itemsize == 1  # the shuffle is blosc2's
    assert len(stored.payload) < store.info("w")["size"]
    got = store.get("w")
    if isinstance(data, np.ndarray):
        assert got.dtype == data.dtype and got.tobytes() == data.tobytes()
    else:
        assert got == data
    kit.reopen()  # read back by a new process: the codec name in the file is enough
    again = kit.store.get("w")
    assert (again.tobytes() if isinstance(data, np.ndarray) else again) == (
        data.tobytes() if isinstance(data, np.ndarray) else data
    )


@pytest.mark.parametrize("threads", [1, 3])
def test_encode_with_blosc2_is_chunked_and_decodes_on_any_thread_count(threads: int) -> None:
    data = bf16_array(5 * CHUNK // 2 + 7).tobytes()
    block = manager(Codec.B2_ZSTD, threads=threads).encode_with(
        data, Candidate(Codec.B2_ZSTD, 1, 2)
    )
    assert block.codec == "b2zstd" and block.itemsize == 1 and block.ratio > 1.3
    for reader_threads in (1, 4):
        assert manager(Codec.ZSTD, threads=reader_threads).decompress(block) == data


def test_reading_a_blosc2_block_without_blosc2_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # blosc2 first and its first trial the cheapest: chosen for L5 while it is installed
    settings = CompressionSettings(
        codecs=[Codec.B2_ZSTD, Codec.ZSTD], expected_reads=0, min_bytes_per_s=0
    )
    timer = StepTimer(cost_s=1.0, costs=[0.001])
    kit = StoreKit(tmp_path / "data", compression=AdaptiveCompression(settings, cpu_timer=timer))
    store = kit.store
    data = bf16_array(50_000)
    store.put("b2", data)
    store.demote("b2", "L5")
    assert store.info("b2")["compression"] == "b2zstd"
    with monkeypatch.context() as patch:
        patch.setattr(blosc2_codec, "library", _missing)
        with pytest.raises(CodecUnavailable) as caught:
            store.get("b2")
        assert "'blosc2'" in caught.value.message and "pip install" in caught.value.message
        assert "b2zstd" in caught.value.message and caught.value.code == "codec_unavailable"
        assert isinstance(caught.value, CorruptBlock)  # handled like one: the block stays
        assert store.locate("b2") == "L5"
        # blocks of our own codecs are written and read as before
        store.put("ours", b"abc" * 30_000)
        store.demote("ours", "L5")
        assert store.info("ours")["compression"] == "zstd"
        assert store.get("ours") == b"abc" * 30_000
    assert store.get("b2").tobytes() == data.tobytes()  # installed again: read back


def _missing() -> None:
    raise ModuleNotFoundError("No module named 'blosc2'", name="blosc2")


def test_damaged_blosc2_chunks_are_corrupt() -> None:
    data = bf16_array(20_000).tobytes()
    reader = manager(Codec.ZSTD)
    block = manager(Codec.B2_ZSTD).encode_with(data, Candidate(Codec.B2_ZSTD, 1, 2))
    assert reader.decompress(block) == data
    truncated = Compressed(block.codec, block.payload[:-10], block.raw_size)
    wrong_size = Compressed(block.codec, block.payload, block.raw_size + 2)
    shuffled = Compressed(block.codec, block.payload, block.raw_size, 2)
    tiny = Compressed(block.codec, b"\x05" * 8, block.raw_size)
    for bad in (truncated, wrong_size, shuffled, tiny):
        with pytest.raises(CorruptBlock) as caught:
            reader.decompress(bad, what="block 'x'")
        assert not isinstance(caught.value, CodecUnavailable)
        assert "block 'x'" in caught.value.message


def test_candidates_list_blosc2_only_where_it_can_be_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = CompressionSettings()  # the default list names blosc2's codecs after ours
    labels = [c.label for c in candidates(settings, Target.FAST, 2)]
    assert labels[6:] == [
        "b2zstd+shuffle2",
        "b2zstd",
        "b2lz4+shuffle2",
        "b2lz4",
        "b2zstdbs+bitshuffle2",
    ]
    assert "b2zstdbs" not in [c.label for c in candidates(settings, Target.FAST, 1)]
    monkeypatch.setattr(blosc2_codec, "library", _missing)
    assert not any(c.codec.is_blosc2 for c in candidates(settings, Target.FAST, 2))
    assert not any(c.codec.is_blosc2 for c in candidates(settings, Target.ARCHIVE, 2))


def test_the_adaptive_choice_picks_blosc2_only_when_available(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # trial costs in candidate order: zstd+shuffle, zstd, then b2zstdbs (the cheapest)
    def make() -> AdaptiveCompression:
        timer = StepTimer(costs=[1.0, 1.0, 0.001])
        settings = CompressionSettings(
            codecs=[Codec.ZSTD, Codec.B2_ZSTD_BITSHUFFLE], expected_reads=0, min_bytes_per_s=0
        )
        return AdaptiveCompression(settings, cpu_timer=timer)

    data = bf16_array(300_000).tobytes()
    with_blosc2 = make()
    block = with_blosc2.compress(data, "dtype=bf16")
    assert block.codec == "b2zstdbs" and with_blosc2.decompress(block) == data
    monkeypatch.setattr(blosc2_codec, "library", _missing)
    without = make()
    block = without.compress(data, "dtype=bf16")
    assert block.codec == "zstd" and block.itemsize == 2
    decision = without.decision_for("dtype=bf16")
    assert decision is not None and len(decision.trials) == 2


def test_a_blosc2_only_codec_list_without_blosc2_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(blosc2_codec, "library", _missing)
    with pytest.raises(ConfigError, match="blosc2"):
        manager(Codec.B2_ZSTD, Codec.B2_LZ4)
    assert manager(Codec.B2_ZSTD, Codec.LZ4).compress(b"a" * 10_000).codec == "lz4"


def test_expected_reads_count_decode_time_in_the_ranking() -> None:
    settings = CompressionSettings(min_bytes_per_s=0)
    raw = 1_000_000

    def trial(codec: Codec, stored: int, decode_s: float, reads: float) -> Trial:
        return Trial(Candidate(codec, 1, 2), raw, stored, 0.002, decode_s, reads)

    # ours: 10 % smaller, decodes in 4 ms; blosc2: decodes in 0.5 ms
    for reads, winner in ((0.0, Codec.ZSTD), (1.0, Codec.B2_ZSTD)):
        trials = [
            trial(Codec.ZSTD, 600_000, 0.004, reads),
            trial(Codec.B2_ZSTD, 660_000, 0.0005, reads),
        ]
        best = choose(trials, Target.FAST, settings, threads=1)
        assert best is not None and best.candidate.codec is winner


def test_sampling_measures_decode_time_when_reads_are_expected() -> None:
    data = bf16_array(200_000).tobytes()
    reading = manager(Codec.ZSTD, Codec.B2_ZSTD).evaluate(data, "dtype=bf16")
    assert reading.trials and all(t.decode_cpu_s > 0 and t.reads == 1.0 for t in reading.trials)
    writing = manager(Codec.ZSTD, Codec.B2_ZSTD, expected_reads=0).evaluate(data, "dtype=bf16")
    assert all(t.decode_cpu_s == 0 for t in writing.trials)


@pytest.mark.parametrize("codec", BLOSC2)
@pytest.mark.parametrize("itemsize", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("size", [1, 13, CHUNK, 2 * CHUNK + 5])
def test_encode_with_round_trips_any_size_and_element_size(
    codec: Codec, itemsize: int, size: int
) -> None:
    data = bf16_array(size // 2 + 1).tobytes()[:size]
    block = manager(codec, threads=2).encode_with(data, Candidate(codec, 1, itemsize))
    assert block.codec == codec.value and block.raw_size == size and block.itemsize == 1
    assert manager(Codec.ZSTD).decompress(block) == data
