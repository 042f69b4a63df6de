"""Hour keys: HKDF-SHA256 as RFC 5869 defines it, the key ring's secret floor and hour window."""

from __future__ import annotations

import pytest

from vramancer.replication.keys import KeyRing, hkdf_sha256, hour_key, hour_of


def test_hkdf_matches_rfc5869_test_case_1() -> None:
    okm = hkdf_sha256(
        bytes([0x0B] * 22),
        salt=bytes(range(0x00, 0x0D)),
        info=bytes(range(0xF0, 0xFA)),
        length=42,
    )
    assert okm == bytes.fromhex(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hour_key_is_hkdf_with_the_salt_and_the_hour_in_info() -> None:
    secret = b"k" * 32
    expected = hkdf_sha256(secret, salt=b"vramancer-ha", info=b"delta-key:472222", length=32)
    assert hour_key(secret, 472222) == expected
    assert len(expected) == 32
    assert hour_key(secret, 472223) != expected
    assert hour_key(b"j" * 32, 472222) != expected


def test_hour_of_counts_utc_hours() -> None:
    assert hour_of(0) == 0
    assert hour_of(3599.9) == 0
    assert hour_of(3600) == 1
    assert hour_of(1_700_001_000.0) == 472222


def test_keyring_refuses_a_31_byte_secret() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        KeyRing(b"x" * 31)
    assert KeyRing(b"x" * 32).key(5) == hour_key(b"x" * 32, 5)


def test_keyring_accepts_the_current_and_previous_hour_only() -> None:
    ring = KeyRing(b"x" * 32)
    assert ring.accepts(100, 100) and ring.accepts(99, 100)
    assert not ring.accepts(98, 100)
    assert not ring.accepts(101, 100)  # a key from the future is not taken either


def test_keyring_caches_and_hides_the_secret() -> None:
    ring = KeyRing(b"y" * 32)
    assert ring.key(7) is ring.key(7)
    assert "y" * 8 not in repr(ring)
