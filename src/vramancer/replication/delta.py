"""A delta (one acknowledged state change) and its sealed record: framed, compressed, signed.

Record layout (big-endian), self-delimiting so records can be concatenated on the wire and in
journal segments::

    magic "VRHJ" | version u8 | length u32 (the whole record) | seq u64 | epoch u64 | hour u64
    | nonce 16 B | codec u8 | payload length u32 (uncompressed) | kind length u8 | kind (ASCII)
    | payload (compressed with codec) | HMAC-SHA256 (32 B) over every byte before it

The HMAC key is the hour key of ``hour`` (``KeyRing.key``). ``open_record`` checks the frame,
then the signature, then the hour window, and only then decompresses.
"""

from __future__ import annotations

import hmac
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from vramancer.errors import VramancerError
from vramancer.replication.codec import Codec, compress, decompress
from vramancer.replication.keys import KeyRing

MAGIC = b"VRHJ"
VERSION = 1
HEADER = struct.Struct(">4sBIQQQ16sBIB")
MAC_BYTES = 32
NONCE_BYTES = 16
MAX_KIND_BYTES = 64
#: Largest uncompressed payload of one delta.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
#: Largest record: a raw payload of the largest size, the longest kind, the frame and the MAC.
MAX_RECORD_BYTES = HEADER.size + MAX_KIND_BYTES + MAX_PAYLOAD_BYTES + MAC_BYTES
MIN_RECORD_BYTES = HEADER.size + 1 + MAC_BYTES
_KIND = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")


class DeltaError(VramancerError):
    """A record that is refused; ``reason`` says why (also its ``code``)."""

    reason = "invalid"
    code = "invalid"
    http_status = 400


class BadSignature(DeltaError):
    """The HMAC does not match: wrong secret, or bytes changed on the way."""

    reason = "bad_signature"
    code = "bad_signature"
    http_status = 401


class StaleKey(DeltaError):
    """Signed under the key of an hour that is neither the current nor the previous one."""

    reason = "stale_key"
    code = "stale_key"
    http_status = 401


class Corrupt(DeltaError):
    """Not a well-formed record (framing, lengths, codec, payload that does not decode)."""

    reason = "corrupt"
    code = "corrupt"
    http_status = 400


class Truncated(Corrupt):
    """The bytes end before the record does (a write cut short, or a partial read)."""


@dataclass(frozen=True, slots=True)
class Delta:
    """One state change. ``payload`` is uncompressed; ``kind`` is a short ASCII name."""

    seq: int
    epoch: int
    hour: int
    nonce: bytes
    kind: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Frame:
    """The header of a record, read without checking its signature."""

    length: int
    seq: int
    epoch: int
    hour: int
    nonce: bytes
    codec: int
    payload_len: int
    kind: str
    #: Where the payload starts, counted from the start of the bytes the frame was read in.
    body_start: int


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def check_delta(delta: Delta) -> None:
    """``InvalidInput``-like ``ValueError`` naming the field that is out of range."""
    for name in ("seq", "epoch", "hour"):
        value = getattr(delta, name)
        if not 0 <= value < 2**64:
            raise ValueError(f"{name}: {value} is not an unsigned 64-bit integer")
    if len(delta.nonce) != NONCE_BYTES:
        raise ValueError(f"nonce: {NONCE_BYTES} bytes expected, got {len(delta.nonce)}")
    if not _KIND.fullmatch(delta.kind):
        raise ValueError(
            f"kind: {delta.kind!r} is not 1 to {MAX_KIND_BYTES} of A-Z a-z 0-9 _ . : / -"
        )
    if len(delta.payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"payload: {len(delta.payload)} bytes, more than the {MAX_PAYLOAD_BYTES} allowed"
        )


def seal(delta: Delta, key: bytes, codec: Codec | None = None) -> bytes:
    """The signed record of ``delta`` (``key`` is the hour key of ``delta.hour``)."""
    check_delta(delta)
    used, body = compress(delta.payload, codec)
    kind = delta.kind.encode("ascii")
    length = HEADER.size + len(kind) + len(body) + MAC_BYTES
    head = HEADER.pack(
        MAGIC,
        VERSION,
        length,
        delta.seq,
        delta.epoch,
        delta.hour,
        delta.nonce,
        int(used),
        len(delta.payload),
        len(kind),
    )
    signed = head + kind + body
    return signed + hmac.digest(key, signed, "sha256")


def read_frame(data: bytes | memoryview, offset: int = 0) -> Frame:
    """The header of the record at ``offset``; ``Corrupt`` when it is not one, or when ``data``
    ends before the record does."""
    if len(data) - offset < HEADER.size:
        raise Truncated("record header is cut short", offset=offset)
    magic, version, length, seq, epoch, hour, nonce, codec, plen, klen = HEADER.unpack_from(
        data, offset
    )
    if magic != MAGIC:
        raise Corrupt("not a journal record (bad magic)", offset=offset)
    if version != VERSION:
        raise Corrupt(f"record version {version} is not supported (only {VERSION})", offset=offset)
    if not HEADER.size + klen + MAC_BYTES <= length <= MAX_RECORD_BYTES or plen > MAX_PAYLOAD_BYTES:
        raise Corrupt(f"record length {length} is out of range", offset=offset)
    if offset + length > len(data):
        raise Truncated(f"record of {length} bytes is cut short", offset=offset)
    start = offset + HEADER.size
    try:
        kind = bytes(data[start : start + klen]).decode("ascii")
    except UnicodeDecodeError:
        raise Corrupt("record kind is not ASCII", offset=offset) from None
    return Frame(length, seq, epoch, hour, nonce, codec, plen, kind, start + klen)


def signature_ok(record: bytes | memoryview, frame: Frame, key: bytes, offset: int = 0) -> bool:
    """Whether the record's MAC matches ``key`` (constant-time comparison)."""
    end = offset + frame.length
    mac = hmac.digest(key, record[offset : end - MAC_BYTES], "sha256")
    return hmac.compare_digest(mac, bytes(record[end - MAC_BYTES : end]))


def open_record(record: bytes, keyring: KeyRing, *, now_hour: int | None) -> Delta:
    """The delta of a single record. ``BadSignature`` (HMAC) before ``StaleKey`` (hour outside
    the current and previous when ``now_hour`` is given) before decompression; ``Corrupt`` for
    a frame that is not a record."""
    frame = read_frame(record)
    if frame.length != len(record):
        raise Corrupt(f"{len(record) - frame.length} bytes follow the record")
    if not signature_ok(record, frame, keyring.key(frame.hour)):
        raise BadSignature("record signature does not match", seq=frame.seq)
    if now_hour is not None and not keyring.accepts(frame.hour, now_hour):
        raise StaleKey(
            f"record signed in hour {frame.hour}, outside hours {now_hour - 1}-{now_hour}",
            seq=frame.seq,
        )
    return delta_of(record, frame)


def delta_of(record: bytes | memoryview, frame: Frame, offset: int = 0) -> Delta:
    """Decode the payload of a record whose signature was checked."""
    try:
        codec = Codec(frame.codec)
    except ValueError:
        raise Corrupt(f"unknown codec id {frame.codec}", seq=frame.seq) from None
    body = bytes(record[frame.body_start : offset + frame.length - MAC_BYTES])
    try:
        payload = decompress(codec, body, max_bytes=frame.payload_len)
    except ValueError as exc:
        raise Corrupt(f"payload does not decode: {exc}", seq=frame.seq) from None
    if len(payload) != frame.payload_len:
        raise Corrupt("payload length differs from the one recorded", seq=frame.seq)
    return Delta(frame.seq, frame.epoch, frame.hour, frame.nonce, frame.kind, payload)


def iter_frames(data: bytes | memoryview) -> Iterator[tuple[int, Frame]]:
    """(offset, frame) of each concatenated record; ``Corrupt`` (with ``offset``) at the first
    byte that does not start a whole record."""
    offset = 0
    while offset < len(data):
        frame = read_frame(data, offset)
        yield offset, frame
        offset += frame.length


def split_records(data: bytes) -> Iterator[bytes]:
    """Each record of a byte string of concatenated records (unverified; ``Corrupt`` when the
    framing breaks)."""
    view = memoryview(data)
    for offset, frame in iter_frames(view):
        yield bytes(view[offset : offset + frame.length])
