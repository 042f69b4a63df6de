"""CompressionManager: round trips, damaged data, the adaptive choice and when it skips."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vramancer.errors import InvalidInput
from vramancer.memory import compression
from vramancer.memory.compression import (
    CHUNK_MAGIC,
    AdaptiveCompression,
    Candidate,
    Codec,
    Compressed,
    CompressionSettings,
    CorruptBlock,
    NoCompression,
    Target,
    Trial,
    candidates,
    choose,
    itemsize_from_hint,
    resolve_target,
    shuffle,
    unshuffle,
)

CHUNK = 64 * 1024  # the smallest chunk size the settings allow: keeps chunked tests small
#: Our own codecs (blosc2's are tests/unit/memory/test_blosc2_codec.py's).
OURS = [codec for codec in Codec if not codec.is_blosc2]


def make_manager(
    threads: int = 1, cpu_timer: Callable[[], float] | None = None, **overrides: object
) -> AdaptiveCompression:
    settings = CompressionSettings.model_validate(
        # expected_reads 0: a StepTimer's ticks are the compression trials alone
        {"chunk_size": CHUNK, "threads": threads, "codecs": OURS, "expected_reads": 0, **overrides}
    )
    if cpu_timer is None:
        return AdaptiveCompression(settings)
    return AdaptiveCompression(settings, cpu_timer=cpu_timer)


class StepTimer:
    """A CPU timer where every trial costs ``cost_s`` (or ``costs[i]`` for the i-th trial)."""

    def __init__(self, cost_s: float = 0.001, costs: Sequence[float] = ()) -> None:
        self.cost_s = cost_s
        self.costs = list(costs)
        self.calls = 0
        self.now = 0.0

    def __call__(self) -> float:
        if self.calls % 2 == 1:  # the end of trial number calls // 2
            index = self.calls // 2
            self.now += self.costs[index] if index < len(self.costs) else self.cost_s
        self.calls += 1
        return self.now

    @property
    def trials(self) -> int:
        return self.calls // 2


def weights(n: int, dtype: str, seed: int = 0) -> np.ndarray:
    """Normally distributed weights like a trained layer's, as fp32, fp16 or bf16 (uint16)."""
    values = (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)
    if dtype == "fp32":
        return values
    if dtype == "fp16":
        return values.astype(np.float16)
    return (values.view(np.uint32) >> 16).astype(np.uint16)  # bf16: the top half of fp32


def structured(n: int, seed: int = 0) -> bytes:
    """Compressible bytes: a small alphabet with runs."""
    rng = np.random.default_rng(seed)
    return bytes(np.repeat(rng.integers(0, 8, n // 4 + 1, dtype=np.uint8), 4)[:n])


DATA: dict[str, Callable[[int], bytes]] = {
    "random": lambda n: np.random.default_rng(7).bytes(n),
    "structured": structured,
    "bf16": lambda n: weights(n // 2 + 1, "bf16").tobytes()[:n],
}


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", OURS)
@pytest.mark.parametrize("itemsize", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("kind", sorted(DATA))
def test_round_trip_every_codec_shuffle_and_threading(
    codec: Codec, itemsize: int, threads: int, kind: str
) -> None:
    manager = make_manager(threads=threads)
    size = 5 * CHUNK + 13  # several chunks, a partial last chunk, a tail shorter than an element
    data = DATA[kind](size)
    block = manager.encode_with(data, Candidate(codec, 1, itemsize))
    assert block.raw_size == size
    if codec is Codec.NONE:
        assert block == Compressed("none", data, size)
    else:
        assert block.codec == codec.value and block.itemsize == itemsize
        # one frame on one thread unshuffled; else chunks (and planes) behind a chunk table
        assert (block.payload[:4] == CHUNK_MAGIC) is (threads > 1 or itemsize > 1)
    assert manager.decompress(block) == data
    assert manager.decompress(block) == data
    manager.close()


def test_thread_count_does_not_change_chunked_output_and_all_decode_each_other() -> None:
    data = weights(200_000, "bf16").tobytes()
    serial, two, four = make_manager(threads=1), make_manager(threads=2), make_manager(threads=4)
    for candidate in candidates(serial.settings, Target.ARCHIVE, 2):
        block = two.encode_with(data, candidate)
        assert four.encode_with(data, candidate) == block
        one = serial.encode_with(data, candidate)
        assert serial.decompress(block) == four.decompress(one) == data
    two.close()
    four.close()


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("target", ["L5", "L6"])
def test_numpy_weights_round_trip_with_dtype_from_hint(dtype: str, target: str) -> None:
    array = weights(150_000, dtype)
    manager = make_manager(threads=2, min_bytes_per_s=0)
    block = manager.compress(array.data, f"layer.0;dtype={dtype}", target=target)
    restored = np.frombuffer(manager.decompress(block), dtype=array.dtype)
    assert np.array_equal(restored, array)
    if target == "L6":
        assert block.codec != "none" and block.itemsize == array.itemsize  # always, shuffled
    else:
        assert block.codec == "none" or block.ratio >= 1.1
    manager.close()


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_shuffle_beats_plain_on_weights(dtype: str) -> None:
    data = weights(300_000, dtype).tobytes()
    size = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    manager = make_manager()
    plain = manager.encode_with(data, Candidate(Codec.ZSTD, 1, 1))
    shuffled = manager.encode_with(data, Candidate(Codec.ZSTD, 1, size))
    assert shuffled.ratio > plain.ratio * 1.05


def test_archive_stores_bf16_shuffled_with_better_ratio_than_plain_zstd() -> None:
    data = weights(400_000, "bf16").tobytes()
    manager = make_manager()
    block = manager.compress(data, "dtype=bf16", force=True)
    assert block.itemsize == 2
    assert block.ratio > manager.encode_with(data, Candidate(Codec.ZSTD, 1, 1)).ratio
    assert manager.decompress(block) == data


def test_empty_block_round_trips() -> None:
    manager = make_manager()
    for target in ("L5", "L6"):
        block = manager.compress(b"", "h", target=target)
        assert block == Compressed("none", b"", 0)
        assert manager.decompress(block) == b""


def test_no_compression_stores_raw_and_decodes_adaptive_blocks() -> None:
    data = structured(3 * CHUNK)
    assert NoCompression().compress(data, force=True) == Compressed("none", data, len(data))
    block = make_manager().compress(data, force=True)
    assert block.codec != "none"
    assert NoCompression().decompress(block) == data


def test_concurrent_compression_from_many_threads() -> None:
    manager = make_manager(threads=2, min_bytes_per_s=0)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for round_ in range(3):
                data = structured(2 * CHUNK + index * 101, seed=index * 10 + round_)
                block = manager.compress(data, f"hint{index % 2}", target="L5")
                assert manager.decompress(block) == data
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert sum(s.blocks for s in manager.stats().values()) == 12
    manager.close()


# --------------------------------------------------------------------------- byte planes


def test_shuffle_layout_is_byte_planes() -> None:
    data = bytes(range(9))  # four 2-byte elements and a 1-byte tail
    assert shuffle(data, 2).tobytes() == bytes([0, 2, 4, 6, 1, 3, 5, 7, 8])
    assert unshuffle(bytes([0, 2, 4, 6, 1, 3, 5, 7, 8]), 2) == data
    assert shuffle(bytes(range(8)), 4).tobytes() == bytes([0, 4, 1, 5, 2, 6, 3, 7])


@given(data=st.binary(max_size=5000), itemsize=st.sampled_from([1, 2, 4, 8]))
def test_unshuffle_inverts_shuffle(data: bytes, itemsize: int) -> None:
    assert unshuffle(shuffle(data, itemsize), itemsize) == data


@pytest.mark.parametrize(
    ("hint", "itemsize"),
    [
        ("dtype=bf16", 2),
        ("kv;dtype=fp16", 2),
        ("model=minilm dtype=float32", 4),
        ("dtype: torch.bfloat16", 2),
        ("dtype=fp64", 8),
        ("dtype=int8", 1),
        ("dtype=complex128", 1),
        ("weights", 1),
        (None, 1),
        ("", 1),
    ],
)
def test_itemsize_from_hint(hint: str | None, itemsize: int) -> None:
    assert itemsize_from_hint(hint) == itemsize


def test_explicit_itemsize_wins_over_hint_and_bad_itemsize_is_rejected() -> None:
    manager = make_manager(min_bytes_per_s=0)
    data = weights(100_000, "fp32").tobytes()
    assert manager.compress(data, "dtype=bf16", itemsize=4, force=True).itemsize in (1, 4)
    for bad in (0, -2):
        with pytest.raises(InvalidInput, match="itemsize"):
            manager.compress(data, itemsize=bad)


@pytest.mark.parametrize("itemsize", [3, 16, 100])
def test_odd_and_wide_elements(itemsize: int) -> None:
    data = weights(100_000, "fp32").tobytes()[:300_007]
    manager = make_manager(threads=2)
    block = manager.compress(data, itemsize=itemsize, force=True)
    assert block.itemsize in ((1, itemsize) if itemsize <= 64 else (1,))
    assert manager.decompress(block) == data
    if itemsize <= 64:
        block = manager.encode_with(data, Candidate(Codec.LZ4, 0, itemsize))
        assert block.itemsize == itemsize
        assert manager.decompress(block) == data
    else:
        with pytest.raises(InvalidInput, match="itemsize"):
            manager.encode_with(data, Candidate(Codec.LZ4, 0, itemsize))
    manager.close()


@pytest.mark.parametrize(
    ("target", "force", "expected"),
    [
        (None, False, Target.FAST),
        (None, True, Target.ARCHIVE),
        ("L5", False, Target.FAST),
        ("l6", False, Target.ARCHIVE),
        ("L4", False, Target.FAST),
        ("archive", False, Target.ARCHIVE),
        (Target.FAST, True, Target.ARCHIVE),
    ],
)
def test_resolve_target(target: str | None, force: bool, expected: Target) -> None:
    assert resolve_target(target, force) is expected


def test_unknown_target_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="target"):
        make_manager().compress(b"x" * 10_000, target="L9")


# --------------------------------------------------------------------------- damaged data


def chunked_block(
    codec: Codec = Codec.ZSTD, itemsize: int = 2, checksum: bool = False
) -> tuple[bytes, Compressed]:
    data = weights(2 * CHUNK, "bf16").tobytes()  # 4 chunks of 64 KiB
    return data, make_manager(checksum=checksum).encode_with(data, Candidate(codec, 1, itemsize))


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.LZ4, Codec.GZIP])
@pytest.mark.parametrize("itemsize", [1, 2])
def test_truncated_payload_is_corrupt(codec: Codec, itemsize: int) -> None:
    data, block = chunked_block(codec, itemsize)
    manager = make_manager(threads=2)
    for cut in (1, 7, len(block.payload) // 3):
        damaged = Compressed(block.codec, block.payload[:-cut], block.raw_size, itemsize)
        with pytest.raises(CorruptBlock, match="blk-3"):
            manager.decompress(damaged, what="blk-3")
    single = manager.encode_with(data[:1000], Candidate(codec, 1, itemsize))
    with pytest.raises(CorruptBlock, match="blk-4"):
        manager.decompress(
            Compressed(single.codec, single.payload[:-5], 1000, itemsize), what="blk-4"
        )
    manager.close()


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.LZ4, Codec.GZIP])
def test_any_flipped_byte_is_detected_or_harmless(codec: Codec) -> None:
    """With ``checksum`` on, even without a container's checksum the codecs' checksums and the
    chunk table's CRC catch damage: never wrong data."""
    data, block = chunked_block(codec, checksum=True)
    manager = make_manager()
    positions = sorted({*range(0, 40), *range(0, len(block.payload), 997)})
    detected = 0
    for position in positions:
        payload = bytearray(block.payload)
        payload[position] ^= 0x10
        damaged = Compressed(block.codec, bytes(payload), block.raw_size, block.itemsize)
        try:
            assert manager.decompress(damaged) == data
        except CorruptBlock:
            detected += 1
    assert detected >= len(positions) - 2


def test_wrong_raw_size_unknown_codec_and_bad_itemsize_are_corrupt() -> None:
    data, block = chunked_block()
    manager = make_manager()
    with pytest.raises(CorruptBlock, match="chunk table does not match"):
        manager.decompress(Compressed(block.codec, block.payload, block.raw_size + 1, 2))
    single = manager.encode_with(data[:5000], Candidate(Codec.ZSTD, 1, 1))
    with pytest.raises(CorruptBlock, match="declares 5000 bytes, expected 4999"):
        manager.decompress(Compressed("zstd", single.payload, 4999))
    with pytest.raises(CorruptBlock, match="unknown codec 'brotli'"):
        manager.decompress(Compressed("brotli", b"x", 1))
    with pytest.raises(CorruptBlock, match="invalid element size 65"):
        manager.decompress(Compressed("zstd", single.payload, 5000, 65))
    with pytest.raises(CorruptBlock, match="shuffled data without its chunk table"):
        manager.decompress(Compressed("zstd", single.payload, 5000, 2))
    with pytest.raises(CorruptBlock, match="cannot be decoded"):
        manager.decompress(Compressed("gzip", b"\x1f\x8b garbage", 10))


def test_damaged_chunk_table_is_corrupt() -> None:
    _, block = chunked_block()
    payload = bytearray(block.payload)
    payload[20] ^= 0x01  # inside the first chunk length
    with pytest.raises(CorruptBlock, match="chunk table checksum mismatch"):
        make_manager().decompress(Compressed(block.codec, bytes(payload), block.raw_size, 2))


# --------------------------------------------------------------------------- the choice


def trial(codec: Codec, ratio: float, mb_per_s: float, itemsize: int = 1) -> Trial:
    raw = 1_000_000
    return Trial(Candidate(codec, 1, itemsize), raw, round(raw / ratio), raw / (mb_per_s * 1e6))


def test_choose_fast_takes_most_bytes_saved_per_cpu_second_among_worthwhile() -> None:
    settings = CompressionSettings()
    zstd = trial(Codec.ZSTD, 1.46, 400)  # saves 126 MB per CPU-second
    lz4 = trial(Codec.LZ4, 1.2, 900)  # saves 150 MB/s: best score
    gzip = trial(Codec.GZIP, 1.5, 60)  # best ratio but under the 100 MB/s floor
    weak = trial(Codec.LZ4, 1.05, 5000, 2)  # fast, but under min_ratio 1.1
    assert choose([zstd, lz4, gzip, weak], Target.FAST, settings, 2) is lz4
    assert choose([zstd, gzip, weak], Target.FAST, settings, 2) is zstd
    assert choose([gzip, weak], Target.FAST, settings, 2) is None
    assert choose([], Target.FAST, settings, 2) is None


def test_choose_fast_against_a_device_write_speed() -> None:
    settings = CompressionSettings(device_write_bytes_per_s="300MB")
    zstd = trial(Codec.ZSTD, 1.46, 400)  # 126 MB/s saved per core
    assert choose([zstd], Target.FAST, settings, 2) is None  # 252 MB/s < 300 MB/s
    assert choose([zstd], Target.FAST, settings, 3) is zstd  # 378 MB/s ≥ 300 MB/s


def test_choose_archive_takes_best_ratio_with_slack_for_speed() -> None:
    settings = CompressionSettings()
    zstd = trial(Codec.ZSTD, 1.46, 400)
    gzip_close = trial(Codec.GZIP, 1.465, 20)  # within 1 %: zstd saves more per second
    gzip_far = trial(Codec.GZIP, 1.6, 20)
    random = trial(Codec.LZ4, 0.99, 900)
    assert choose([zstd, gzip_close, random], Target.ARCHIVE, settings, 1) is zstd
    assert choose([zstd, gzip_close, gzip_far], Target.ARCHIVE, settings, 1) is gzip_far
    assert choose([random], Target.ARCHIVE, settings, 1) is None
    strict = CompressionSettings(archive_ratio_slack=0.0)
    assert choose([zstd, gzip_close], Target.ARCHIVE, strict, 1) is gzip_close


def test_candidates_order_and_levels() -> None:
    settings = CompressionSettings(codecs=OURS)
    labels = [c.label for c in candidates(settings, Target.FAST, 2)]
    assert labels == [
        "zstd-1+shuffle2",
        "zstd-1",
        "lz4+shuffle2",
        "lz4",
        "gzip-1+shuffle2",
        "gzip-1",
    ]
    labels = [c.label for c in candidates(settings, Target.ARCHIVE, 1)]
    assert labels == ["zstd-1", "zstd-3", "lz4", "gzip-1", "gzip-6"]
    no_shuffle = CompressionSettings(shuffle=False, codecs=["lz4", "none"])
    assert [c.label for c in candidates(no_shuffle, Target.FAST, 4)] == ["lz4"]


def test_choice_is_remembered_per_hint_and_reevaluated() -> None:
    timer = StepTimer()
    manager = make_manager(cpu_timer=timer, reevaluate_every=3, min_bytes_per_s=0)
    per_sample = len(candidates(manager.settings, Target.FAST, 2))
    data = weights(300_000, "bf16").tobytes()  # larger than the sample: sampled, not reused
    manager.compress(data, "kv;dtype=bf16")
    assert timer.trials == per_sample
    decision = manager.decision_for("kv;dtype=bf16")
    assert decision is not None and decision.candidate is not None
    assert len(decision.trials) == per_sample
    # equal CPU cost per trial: the most bytes saved wins, i.e. the best ratio: shuffled zstd
    assert decision.candidate == Candidate(Codec.ZSTD, 1, 2)
    for _ in range(2):
        block = manager.compress(data, "kv;dtype=bf16")
        assert block.codec == "zstd" and block.itemsize == 2
    assert timer.trials == per_sample  # uses 2 and 3: remembered, nothing sampled
    manager.compress(data, "kv;dtype=bf16")  # fourth use: sampled again
    assert timer.trials == 2 * per_sample
    manager.compress(data, "other;dtype=bf16")  # another hint: its own choice
    assert timer.trials == 3 * per_sample
    assert manager.decision_for("other;dtype=bf16") is not None
    assert manager.decision_for("kv;dtype=bf16", target="L6") is None  # per target too


def test_blocks_without_hint_share_one_remembered_choice() -> None:
    timer = StepTimer()
    manager = make_manager(cpu_timer=timer, min_bytes_per_s=0)
    manager.compress(structured(400_000))
    manager.compress(structured(300_000, seed=3))
    assert timer.trials == len(candidates(manager.settings, Target.FAST, 1))
    decision = manager.decision_for(None)
    assert decision is not None and decision.uses == 2


def test_archive_retries_a_remembered_nothing_shrinks() -> None:
    timer = StepTimer()
    manager = make_manager(cpu_timer=timer)
    per_sample = len(candidates(manager.settings, Target.ARCHIVE, 1))
    noise = os.urandom(300_000)
    assert manager.compress(noise, "h", force=True).codec == "none"
    decision = manager.decision_for("h", target="L6")
    assert decision is not None and decision.candidate is None
    assert manager.compress(noise, "h", force=True).codec == "none"  # tried zstd: raw again
    assert manager.decision_for("h", target="L6") is decision  # kept: it was right
    data = structured(300_000)
    block = manager.compress(data, "h", force=True)  # not sampled: the first candidate
    assert block.codec == "zstd" and manager.decompress(block) == data
    assert timer.trials == per_sample
    assert manager.decision_for("h", target="L6") is None  # wrong for this block: resample
    manager.compress(data, "h", force=True)
    assert timer.trials == 2 * per_sample


def test_small_block_reuses_the_sample_output(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Codec] = []
    real = compression.codec_compress

    def counting(codec: Codec, data: object, level: int, checksum: bool = False) -> bytes:
        calls.append(codec)
        return real(codec, data, level, checksum)

    monkeypatch.setattr(compression, "codec_compress", counting)
    manager = make_manager(cpu_timer=StepTimer(), min_bytes_per_s=0)
    data = structured(60_000)  # under the sample size and one chunk: the sample is the block
    block = manager.compress(data, "h")
    assert len(calls) == len(candidates(manager.settings, Target.FAST, 1))  # no second pass
    assert block.codec != "none" and block.payload[:4] != CHUNK_MAGIC
    assert manager.decompress(block) == data


def test_choice_that_stops_paying_is_dropped() -> None:
    manager = make_manager(cpu_timer=StepTimer(), min_bytes_per_s=0)
    manager.compress(structured(400_000), "h")
    assert manager.decision_for("h") is not None
    noise = os.urandom(400_000)
    block = manager.compress(noise, "h")  # remembered codec used, did not pay: stored raw
    assert block == Compressed("none", noise, len(noise))
    assert manager.decision_for("h") is None


# --------------------------------------------------------------------------- skipping


def test_random_data_is_stored_raw_for_both_targets() -> None:
    manager = make_manager()
    data = os.urandom(300_000)
    for target in ("L5", "L6"):
        block = manager.compress(data, "rnd", target=target)
        assert block == Compressed("none", data, len(data))
        assert manager.decompress(block) == data


def test_fast_target_skips_when_too_slow_but_archive_compresses() -> None:
    slow = StepTimer(cost_s=10.0)  # 256 KiB in 10 CPU-seconds: far under 100 MB/s
    manager = make_manager(cpu_timer=slow)
    data = structured(300_000)
    assert manager.compress(data, "h", target="L5").codec == "none"
    decision = manager.decision_for("h", target="L5")
    assert decision is not None and decision.candidate is None
    assert manager.compress(data, "h", force=True).codec != "none"


def test_fast_target_skips_when_the_ratio_is_too_small() -> None:
    manager = make_manager(min_ratio=1.3, min_bytes_per_s=0)
    data = weights(200_000, "fp32").tobytes()  # about 1.2× at best
    assert manager.compress(data, "dtype=fp32").codec == "none"
    assert manager.compress(data, "dtype=fp32", force=True).codec != "none"


def test_small_blocks_and_disabled_compression_are_raw() -> None:
    data = structured(4000)
    assert make_manager().compress(data, target="L5").codec == "none"
    assert make_manager().compress(data, target="L6").codec != "none"
    off = make_manager(enabled=False)
    assert off.compress(structured(400_000), force=True).codec == "none"


def test_only_the_cheaper_codec_clears_a_tight_speed_floor() -> None:
    # costs in candidate order: zstd+shuffle, zstd, lz4+shuffle, lz4, gzip+shuffle, gzip
    costs = [1.0, 1.0, 0.0001, 0.0001, 1.0, 1.0]
    timer = StepTimer(costs=costs)
    manager = make_manager(cpu_timer=timer, min_ratio=1.01)
    data = weights(300_000, "bf16").tobytes()
    manager.compress(data, "dtype=bf16")
    decision = manager.decision_for("dtype=bf16")
    assert decision is not None and decision.candidate is not None
    assert decision.candidate.codec is Codec.LZ4


def test_stats_count_blocks_and_bytes_per_codec() -> None:
    manager = make_manager()
    data = structured(300_000)
    noise = os.urandom(5000)
    stored = manager.compress(data, force=True)
    manager.compress(noise, force=True)
    stats = manager.stats()
    assert stats["none"].blocks == 1 and stats["none"].raw_bytes == 5000
    assert stats[stored.codec].stored_bytes == stored.stored_size
    assert stats[stored.codec].raw_bytes == 300_000


# --------------------------------------------------------------------------- property


@st.composite
def blocks(draw: st.DrawFn) -> tuple[bytes, int, str, int]:
    size = draw(st.integers(min_value=0, max_value=4 * CHUNK + 100))
    kind = draw(st.sampled_from(sorted(DATA)))
    seed = draw(st.integers(min_value=0, max_value=2**16))
    rng = np.random.default_rng(seed)
    if kind == "random":
        data = rng.bytes(size)
    elif kind == "structured":
        data = structured(size, seed)
    else:
        data = weights(size // 2 + 1, "bf16", seed).tobytes()[:size]
    itemsize = draw(st.sampled_from([1, 2, 4, 8]))
    target = draw(st.sampled_from(["L5", "L6"]))
    threads = draw(st.sampled_from([1, 2]))
    return data, itemsize, target, threads


_managers: dict[int, AdaptiveCompression] = {}


def _manager_for(threads: int) -> AdaptiveCompression:
    if threads not in _managers:
        _managers[threads] = make_manager(threads=threads, min_bytes_per_s=0)
    return _managers[threads]


@pytest.fixture(scope="module", autouse=True)
def _close_managers() -> Iterator[None]:
    yield
    for manager in _managers.values():
        manager.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=blocks(), hint=st.sampled_from([None, "a", "b;dtype=fp16"]))
def test_property_compress_round_trips(case: tuple[bytes, int, str, int], hint: str | None) -> None:
    data, itemsize, target, threads = case
    manager = _manager_for(threads)
    block = manager.compress(data, hint, itemsize=itemsize, target=target)
    assert block.raw_size == len(data)
    assert block.stored_size <= len(data)
    assert manager.decompress(block) == data
    assert manager.decompress(block) == data
