"""The fastpath's wire format (pure): length-prefixed frames, every block with its checksum.

A connection starts with the server's greeting ``VRFP | version u8 | nonce 16 bytes``; the client
answers ``HMAC-SHA256(secret, nonce)`` (32 bytes; zeros when no secret is configured, which a
server accepts only from loopback). Then requests, one after the other::

    request:  "VRFQ" | op u8 | id length u16 | id (UTF-8) | body length u64 | body checksum u64
              | body (PUT only)
    answer:   "VRFA" | status u8 | length u64 | xxh3-64 u64 | name length u16 | name | payload

``op``: GET (the block's bytes), GET_SHM (the bytes left in a shared-memory segment whose
``name`` the answer gives: processes on one host), PUT (store the body as the block), PUT_SHM
(the body is ``data length u64 | segment name``: store the segment's bytes as the block), PING
(nothing: a round trip), PROBE (``length`` bytes of filler, for bandwidth), PROBE_SHM (the same
left in a shared-memory segment). ``status``: OK, NOT_FOUND, REFUSED (bad request, denied), ERROR.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

GREETING = struct.Struct("<4sB16s")
GREETING_MAGIC = b"VRFP"
VERSION = 1
AUTH_SIZE = 32
REQUEST = struct.Struct("<4sBH")
REQUEST_MAGIC = b"VRFQ"
BODY = struct.Struct("<QQ")
ANSWER = struct.Struct("<4sBQQH")
ANSWER_MAGIC = b"VRFA"
#: Longest block id on the wire (the memory store's own limit is below it).
MAX_ID_BYTES = 1024
#: Longest shared-memory segment name.
MAX_NAME_BYTES = 255


class Op(IntEnum):
    GET = 1
    GET_SHM = 2
    PUT = 3
    PING = 4
    PROBE = 5
    PUT_SHM = 6
    PROBE_SHM = 7


class Status(IntEnum):
    OK = 0
    NOT_FOUND = 1
    REFUSED = 2
    ERROR = 3


class FrameError(Exception):
    """A frame that does not parse: the connection is closed."""


@dataclass(frozen=True, slots=True)
class Request:
    op: Op
    block_id: str
    length: int = 0
    checksum: int = 0


@dataclass(frozen=True, slots=True)
class Answer:
    status: Status
    length: int = 0
    checksum: int = 0
    name: str = ""


def pack_request(req: Request) -> bytes:
    raw_id = req.block_id.encode()
    if len(raw_id) > MAX_ID_BYTES:
        raise FrameError(f"block id of {len(raw_id)} bytes (at most {MAX_ID_BYTES})")
    head = REQUEST.pack(REQUEST_MAGIC, int(req.op), len(raw_id))
    return head + raw_id + BODY.pack(req.length, req.checksum)


def unpack_request_head(head: bytes) -> tuple[Op, int]:
    """``(op, id length)`` from the first ``REQUEST.size`` bytes."""
    magic, op, id_len = REQUEST.unpack(head)
    if magic != REQUEST_MAGIC:
        raise FrameError("not a fastpath request")
    try:
        kind = Op(op)
    except ValueError:
        raise FrameError(f"unknown operation {op}") from None
    if id_len > MAX_ID_BYTES:
        raise FrameError(f"block id of {id_len} bytes (at most {MAX_ID_BYTES})")
    return kind, id_len


def pack_answer(answer: Answer) -> bytes:
    name = answer.name.encode()
    if len(name) > MAX_NAME_BYTES:
        raise FrameError("segment name too long")
    head = ANSWER.pack(ANSWER_MAGIC, int(answer.status), answer.length, answer.checksum, len(name))
    return head + name


def unpack_answer_head(head: bytes) -> tuple[Status, int, int, int]:
    """``(status, length, checksum, name length)`` from the first ``ANSWER.size`` bytes."""
    magic, status, length, checksum, name_len = ANSWER.unpack(head)
    if magic != ANSWER_MAGIC:
        raise FrameError("not a fastpath answer")
    try:
        kind = Status(status)
    except ValueError:
        raise FrameError(f"unknown status {status}") from None
    if name_len > MAX_NAME_BYTES:
        raise FrameError("segment name too long")
    return kind, length, checksum, name_len


def filler(length: int) -> bytes:
    """PROBE's payload: ``length`` bytes that cost nothing to make."""
    return bytes(length)
