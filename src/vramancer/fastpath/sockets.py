"""Reading and writing exact byte counts on a blocking socket, and the greeting's proof."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from typing import Any

from vramancer.fastpath.errors import FastpathError
from vramancer.fastpath.frames import AUTH_SIZE

#: Size of one read into a preallocated buffer.
_CHUNK = 1024 * 1024


def blocking_with_timeout(sock: socket.socket, timeout_s: float) -> None:
    """Blocking I/O bounded by the kernel (``SO_RCVTIMEO``/``SO_SNDTIMEO``) rather than by
    Python's socket timeout, which polls before every call: a large block arrives in fewer,
    cheaper calls. A timeout is then an ``OSError`` (``EAGAIN``)."""
    sock.settimeout(None)
    whole = int(timeout_s)
    value = struct.pack("ll", whole, int((timeout_s - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def recv_exact(
    sock: socket.socket, n: int, what: str = "data", digest: Any | None = None
) -> bytearray:
    """Exactly ``n`` bytes, or ``FastpathError`` naming how many came before the peer left;
    ``digest`` (an ``xxhash`` hasher) is fed each piece as it arrives, still in the cache."""
    buf = bytearray(n)
    recv_exact_into(sock, memoryview(buf), what, digest)
    return buf


def recv_exact_into(
    sock: socket.socket, view: memoryview, what: str = "data", digest: Any | None = None
) -> None:
    """Fill ``view`` exactly from ``sock`` (as :func:`recv_exact`, into memory the caller owns)."""
    n = len(view)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], min(n - got, _CHUNK))
        except (TimeoutError, BlockingIOError):
            raise FastpathError(f"peer went quiet after {got} of {n} bytes of {what}") from None
        except OSError as exc:
            raise FastpathError(
                f"connection lost after {got} of {n} bytes of {what}: {exc}"
            ) from None
        if k == 0:
            raise FastpathError(f"peer closed the connection after {got} of {n} bytes of {what}")
        if digest is not None:
            digest.update(view[got : got + k])
        got += k


def send_file(sock: socket.socket, fd: int, offset: int, length: int) -> None:
    """``length`` bytes of ``fd`` from ``offset`` on the socket, without a copy (``sendfile``,
    waiting for room on a socket that has a timeout, as ``socket.sendfile`` does)."""
    with os.fdopen(fd, "rb", closefd=False) as file:
        sent = sock.sendfile(file, offset, length)
    if sent != length:
        raise FastpathError(f"the block file ended after {sent} of {length} bytes")


def proof(secret: str | None, nonce: bytes) -> bytes:
    """What a client sends back for ``nonce``: its HMAC under ``secret``, zeros without one."""
    if secret is None:
        return bytes(AUTH_SIZE)
    return hmac.new(secret.encode(), nonce, hashlib.sha256).digest()


def is_loopback(address: str) -> bool:
    return address in ("127.0.0.1", "::1", "localhost") or address.startswith("127.")
