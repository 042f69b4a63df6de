"""Sealed records: round trips, tamper detection, the hour window, framing."""

from __future__ import annotations

import os

import pytest

from tests.unit.replication.conftest import HOUR
from vramancer.replication.codec import Codec, available
from vramancer.replication.delta import (
    BadSignature,
    Corrupt,
    Delta,
    DeltaError,
    StaleKey,
    open_record,
    read_frame,
    seal,
    split_records,
)
from vramancer.replication.keys import KeyRing

PAYLOAD = b'{"block": "b-42", "tier": "L5", "bytes": 1048576}' * 8


def make_delta(seq: int = 7, *, hour: int = HOUR, payload: bytes = PAYLOAD) -> Delta:
    return Delta(seq, 2, hour, os.urandom(16), "memory.put", payload)


@pytest.mark.parametrize("codec", available())
def test_round_trip_for_every_codec(keyring: KeyRing, codec: Codec) -> None:
    delta = make_delta()
    record = seal(delta, keyring.key(delta.hour), codec)
    assert read_frame(record).codec == codec
    assert open_record(record, keyring, now_hour=HOUR) == delta


def test_empty_payload_round_trips(keyring: KeyRing) -> None:
    delta = make_delta(payload=b"")
    assert open_record(seal(delta, keyring.key(HOUR)), keyring, now_hour=None) == delta


def test_one_flipped_byte_anywhere_is_refused(keyring: KeyRing) -> None:
    record = seal(make_delta(), keyring.key(HOUR))
    for i in range(len(record)):
        damaged = bytearray(record)
        damaged[i] ^= 0x01
        with pytest.raises(DeltaError) as caught:
            open_record(bytes(damaged), keyring, now_hour=HOUR)
        assert isinstance(caught.value, BadSignature | Corrupt), i
        assert caught.value.reason in ("bad_signature", "corrupt")
    # Past the frame (seq, epoch, hour, nonce, payload, MAC), it is the signature that fails.
    damaged = bytearray(record)
    damaged[len(record) // 2] ^= 0x80
    with pytest.raises(BadSignature):
        open_record(bytes(damaged), keyring, now_hour=HOUR)


def test_another_secret_is_a_bad_signature(keyring: KeyRing) -> None:
    record = seal(make_delta(), keyring.key(HOUR))
    with pytest.raises(BadSignature) as caught:
        open_record(record, KeyRing(b"t" * 32), now_hour=HOUR)
    assert caught.value.reason == "bad_signature" and caught.value.http_status == 401


def test_hour_window(keyring: KeyRing) -> None:
    for hour in (HOUR, HOUR - 1):
        delta = make_delta(hour=hour)
        assert open_record(seal(delta, keyring.key(hour)), keyring, now_hour=HOUR) == delta
    old = seal(make_delta(hour=HOUR - 2), keyring.key(HOUR - 2))
    with pytest.raises(StaleKey) as caught:
        open_record(old, keyring, now_hour=HOUR)
    assert caught.value.reason == "stale_key"
    assert open_record(old, keyring, now_hour=None).hour == HOUR - 2  # no window: journals


def test_signature_is_checked_before_the_hour(keyring: KeyRing) -> None:
    old = bytearray(seal(make_delta(hour=HOUR - 5), keyring.key(HOUR - 5)))
    old[-1] ^= 1
    with pytest.raises(BadSignature):
        open_record(bytes(old), keyring, now_hour=HOUR)


def test_framing_errors_are_corrupt(keyring: KeyRing) -> None:
    record = seal(make_delta(), keyring.key(HOUR))
    for bad in (b"", record[:10], record[:-1], record + b"\0", b"XXXX" + record[4:]):
        with pytest.raises(Corrupt) as caught:
            open_record(bad, keyring, now_hour=HOUR)
        assert caught.value.reason == "corrupt"


def test_split_records_cuts_a_batch(keyring: KeyRing) -> None:
    records = [seal(make_delta(seq), keyring.key(HOUR)) for seq in range(1, 6)]
    assert list(split_records(b"".join(records))) == records
    assert list(split_records(b"")) == []
    with pytest.raises(Corrupt):
        list(split_records(b"".join(records)[:-3]))


@pytest.mark.parametrize(
    ("field", "delta"),
    [
        ("kind", Delta(1, 1, HOUR, bytes(16), "no spaces", b"")),
        ("kind", Delta(1, 1, HOUR, bytes(16), "k" * 65, b"")),
        ("nonce", Delta(1, 1, HOUR, bytes(8), "kind", b"")),
        ("seq", Delta(-1, 1, HOUR, bytes(16), "kind", b"")),
    ],
)
def test_seal_names_the_bad_field(keyring: KeyRing, field: str, delta: Delta) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        seal(delta, keyring.key(HOUR))
