"""``FastInterface`` implementations that reach another node: TCP and shared memory.

Both talk to a peer's fastpath server (``host:port``); ``recv(block_id, peer)`` brings the block's
bytes here, checked against the checksum the peer sent (a mismatch or a peer that leaves
mid-transfer is a ``FastpathError``, and nothing is kept), ``send(block_id, data, peer)`` stores
them there. ``shm`` moves the bytes through a shared-memory segment: only for a peer on this
host. The in-process ``LocalCopyInterface`` (``memory/fastpath.py``) stays the baseline.
Each transfer's seconds go to ``vramancer_fastpath_interface_latency_seconds{interface}``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable
from multiprocessing import shared_memory

import xxhash

from vramancer.errors import NotFound
from vramancer.fastpath.errors import FastpathError
from vramancer.fastpath.frames import (
    ANSWER,
    GREETING,
    GREETING_MAGIC,
    Answer,
    FrameError,
    Op,
    Request,
    Status,
    pack_request,
    unpack_answer_head,
)
from vramancer.fastpath.server import buffer, untracked
from vramancer.fastpath.sockets import blocking_with_timeout, proof, recv_exact, recv_exact_into
from vramancer.memory.blockfile import checksum
from vramancer.memory.fastpath import LATENCY_BUCKETS, LATENCY_METRIC
from vramancer.observability.metrics import Metrics

#: PUT_SHM's body: the data's length, then the segment's name.
_SHM_BODY = struct.Struct("<Q")


def split_address(peer: str) -> tuple[str, int]:
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise FastpathError(f"peer {peer!r} is not host:port")
    return host.strip("[]"), int(port)


class Connection:
    """One authenticated connection to a peer's fastpath server."""

    def __init__(self, peer: str, secret: str | None, timeout_s: float) -> None:
        self.peer = peer
        try:
            self.sock = socket.create_connection(split_address(peer), timeout=timeout_s)
        except OSError as exc:
            raise FastpathError(f"cannot reach fastpath peer {peer}: {exc}") from None
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            blocking_with_timeout(self.sock, timeout_s)
            magic, _, nonce = GREETING.unpack(recv_exact(self.sock, GREETING.size, "a greeting"))
            if magic != GREETING_MAGIC:
                raise FastpathError(f"{peer} is not a fastpath server")
            self.sock.sendall(proof(secret, nonce))
        except BaseException:
            self.close()
            raise

    def ask(self, req: Request, body: bytes | memoryview = b"") -> tuple[Answer, socket.socket]:
        """Send ``req`` (and its body); the answer's head (the payload is left to read)."""
        try:
            self.sock.sendall(pack_request(req))
            if body:
                self.sock.sendall(body)
            head = recv_exact(self.sock, ANSWER.size, "an answer")
            status, length, digest, name_len = unpack_answer_head(bytes(head))
            name = bytes(recv_exact(self.sock, name_len, "a name")).decode() if name_len else ""
        except FrameError as exc:
            raise FastpathError(f"{self.peer}: {exc}") from None
        except OSError as exc:
            raise FastpathError(f"{self.peer}: connection lost: {exc}") from None
        if status is Status.REFUSED:
            raise FastpathError(f"{self.peer} refused the request for {req.block_id!r}")
        if status is Status.ERROR:
            raise FastpathError(f"{self.peer} could not serve {req.block_id!r}")
        return Answer(status, length, digest, name), self.sock

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _checked(data: bytearray, answer: Answer, block_id: str, peer: str) -> bytearray:
    if checksum(data) != answer.checksum:
        raise FastpathError(f"block {block_id!r} from {peer}: checksum mismatch, not kept")
    return data


class _PeerInterface:
    name = ""

    def __init__(
        self, secret: str | None = None, timeout_s: float = 10.0, metrics: Metrics | None = None
    ) -> None:
        self.secret = secret
        self.timeout_s = timeout_s
        self._latency = (
            metrics.histogram(
                LATENCY_METRIC,
                "Seconds one fastpath transfer took, per interface.",
                ["interface"],
                buckets=LATENCY_BUCKETS,
            ).labels(interface=self.name)
            if metrics is not None
            else None
        )

    def connect(self, peer: str | None) -> Connection:
        if peer is None:
            raise FastpathError(f"the {self.name} interface needs a peer (host:port)")
        return Connection(peer, self.secret, self.timeout_s)

    def _observe(self, start: float) -> None:
        if self._latency is not None:
            self._latency.observe(time.perf_counter() - start)


class TcpInterface(_PeerInterface):
    """Block bytes over TCP (the peer sends from its block file without a copy)."""

    name = "tcp"

    def recv(self, block_id: str, peer: str | None = None) -> bytearray:
        """The block's bytes, in the buffer they arrived in (no copy)."""
        got: list[bytearray] = []

        def fresh(length: int) -> memoryview:
            got.append(bytearray(length))
            return memoryview(got[0])

        self._get(block_id, peer, fresh)
        return got[0]

    def recv_into(self, block_id: str, out: bytearray | memoryview, peer: str | None = None) -> int:
        """The block's bytes written at the start of ``out`` (memory the caller reuses, as a
        receive buffer or a tier's slot); answers the block's length. ``out`` too small → a
        ``FastpathError`` before any byte is read; a bad checksum → ``FastpathError`` (``out``
        then holds bytes that must not be used)."""
        target = memoryview(out).cast("B")

        def into(length: int) -> memoryview:
            if length > len(target):
                raise FastpathError(
                    f"block {block_id!r} is {length} bytes, the buffer {len(target)}"
                )
            return target[:length]

        return self._get(block_id, peer, into)

    def _get(self, block_id: str, peer: str | None, into: Callable[[int], memoryview]) -> int:
        """One ``GET``: the block's bytes into ``into(length)``, checked; answers the length."""
        start = time.perf_counter()
        conn = self.connect(peer)
        try:
            answer, sock = conn.ask(Request(Op.GET, block_id))
            if answer.status is Status.NOT_FOUND:
                raise NotFound(f"no block {block_id!r} on {peer}")
            digest = xxhash.xxh3_64()
            recv_exact_into(sock, into(answer.length), f"block {block_id!r}", digest)
        finally:
            conn.close()
        if digest.intdigest() != answer.checksum:
            raise FastpathError(f"block {block_id!r} from {conn.peer}: checksum mismatch, not kept")
        self._observe(start)
        return answer.length

    def send(
        self, block_id: str, data: bytes | bytearray | memoryview, peer: str | None = None
    ) -> int:
        start = time.perf_counter()
        view = memoryview(data).cast("B")
        conn = self.connect(peer)
        try:
            conn.ask(Request(Op.PUT, block_id, len(view), checksum(view)), view)
        finally:
            conn.close()
        self._observe(start)
        return len(view)


class ShmInterface(_PeerInterface):
    """Block bytes through a shared-memory segment, for a peer on this host."""

    name = "shm"

    def recv(self, block_id: str, peer: str | None = None) -> bytearray:
        """The block's bytes, copied out of the peer's segment."""
        start = time.perf_counter()
        conn = self.connect(peer)
        try:
            answer, _ = conn.ask(Request(Op.GET_SHM, block_id))
            if answer.status is Status.NOT_FOUND:
                raise NotFound(f"no block {block_id!r} on {peer}")
            segment = attach(answer.name, conn.peer)
            try:
                data = _checked(
                    bytearray(buffer(segment)[: answer.length]), answer, block_id, conn.peer
                )
            finally:
                segment.close()
        finally:
            conn.close()  # the peer removes the segment when the connection ends
        self._observe(start)
        return data

    def send(
        self, block_id: str, data: bytes | bytearray | memoryview, peer: str | None = None
    ) -> int:
        start = time.perf_counter()
        view = memoryview(data).cast("B")
        segment = shared_memory.SharedMemory(create=True, size=max(1, len(view)))
        try:
            buffer(segment)[: len(view)] = view
            body = _SHM_BODY.pack(len(view)) + segment.name.encode()
            conn = self.connect(peer)
            try:
                conn.ask(Request(Op.PUT_SHM, block_id, len(body), checksum(view)), body)
            finally:
                conn.close()
        finally:
            segment.close()
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
        self._observe(start)
        return len(view)


def attach(name: str, peer: str) -> shared_memory.SharedMemory:
    try:
        return untracked(shared_memory.SharedMemory(name=name))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise FastpathError(
            f"{peer}: its shared-memory segment is not reachable here: {exc}"
        ) from None
