"""Payload codecs: adaptive choice, round trips, and bounded decompression."""

from __future__ import annotations

import os

import pytest

from vramancer.replication.codec import (
    Codec,
    TooLarge,
    available,
    best_codec,
    compress,
    decompress,
)

TEXT = b'{"op": "task.created", "id": "t-000123", "priority": "normal"}\n' * 40


def test_best_codec_is_zstd_when_installed() -> None:
    assert best_codec() is Codec.ZSTD  # zstandard is a dependency of the package
    assert set(available()) == set(Codec)


@pytest.mark.parametrize("codec", [c for c in Codec if c is not Codec.RAW])
def test_round_trip_with_each_codec(codec: Codec) -> None:
    used, packed = compress(TEXT, codec)
    assert used is codec and len(packed) < len(TEXT) / 4
    assert decompress(used, packed, max_bytes=len(TEXT)) == TEXT


def test_tiny_and_incompressible_payloads_stay_raw() -> None:
    assert compress(b"x" * 127) == (Codec.RAW, b"x" * 127)
    noise = os.urandom(4096)
    assert compress(noise) == (Codec.RAW, noise)
    assert compress(TEXT)[0] is best_codec()


@pytest.mark.parametrize("codec", list(Codec))
def test_decompress_refuses_output_over_the_bound(codec: Codec) -> None:
    bomb = bytes(64 * 1024 * 1024) if codec is not Codec.RAW else bytes(2048)
    used, packed = compress(bomb, codec)
    assert used is codec
    if codec is not Codec.RAW:
        assert len(packed) < 1024 * 1024  # a small input ...
    with pytest.raises(TooLarge):
        decompress(codec, packed, max_bytes=1024)  # ... never expands past the bound


@pytest.mark.parametrize("codec", [Codec.GZIP, Codec.LZ4, Codec.ZSTD])
def test_damaged_or_cut_data_is_a_value_error(codec: Codec) -> None:
    _, packed = compress(TEXT, codec)
    with pytest.raises(ValueError):
        decompress(codec, packed[: len(packed) // 2], max_bytes=len(TEXT))
