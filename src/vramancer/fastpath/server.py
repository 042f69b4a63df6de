"""The fastpath server: this node's blocks to its peers, one thread per connection.

A GET sends a block stored uncompressed on a disk tier straight from its file (``sendfile``: no
copy through this process), any other block from its bytes; every answer carries the block's
xxh3-64, checked by the receiver. GET_SHM leaves the bytes in a shared-memory segment for a
process on this host, removed at the connection's next request or end. PUT stores a block
whose bytes match their checksum, and only then. Requests are bounded (block id, body size);
a connection proves the shared secret first, or comes from loopback when there is none.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import socket
import socketserver
import struct
import threading
from multiprocessing import shared_memory
from typing import Any, Protocol

from vramancer.errors import NotFound, VramancerError
from vramancer.fastpath.errors import FastpathError
from vramancer.fastpath.frames import (
    AUTH_SIZE,
    BODY,
    GREETING,
    GREETING_MAGIC,
    REQUEST,
    VERSION,
    Answer,
    FrameError,
    Op,
    Status,
    filler,
    pack_answer,
    unpack_request_head,
)
from vramancer.fastpath.settings import FastpathSettings
from vramancer.fastpath.sockets import is_loopback, proof, recv_exact, send_file
from vramancer.memory.blockfile import checksum
from vramancer.memory.exports import BlockExport

log = logging.getLogger(__name__)

#: Largest PROBE payload served.
MAX_PROBE_BYTES = 1024**3


class BlockSource(Protocol):
    """What the server needs of the memory store."""

    def export(self, block_id: str) -> BlockExport: ...

    def put(
        self, block_id: str, data: object, priority: int = 0, hint: str | None = None
    ) -> str: ...


class _Handler(socketserver.BaseRequestHandler):
    server: FastpathServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(self.server.settings.timeout_s)
        segments: list[shared_memory.SharedMemory] = []
        try:
            if not self._greet(sock):
                return
            while True:
                try:
                    head = recv_exact(sock, REQUEST.size, "a request")
                except FastpathError:
                    return  # the client is done
                _drop(segments)
                self._serve(sock, bytes(head), segments)
        except (FastpathError, FrameError, OSError) as exc:
            log.debug("fastpath connection from %s ended: %s", self.client_address, exc)
        finally:
            _drop(segments)

    def _greet(self, sock: socket.socket) -> bool:
        nonce = secrets.token_bytes(16)
        sock.sendall(GREETING.pack(GREETING_MAGIC, VERSION, nonce))
        answer = bytes(recv_exact(sock, AUTH_SIZE, "the greeting"))
        secret = self.server.settings.secret
        if secret is None:
            return is_loopback(self.client_address[0]) and answer == bytes(AUTH_SIZE)
        return hmac.compare_digest(answer, proof(secret, nonce))

    def _serve(
        self, sock: socket.socket, head: bytes, segments: list[shared_memory.SharedMemory]
    ) -> None:
        op, id_len = unpack_request_head(head)
        block_id = bytes(recv_exact(sock, id_len, "a block id")).decode()
        length, digest = BODY.unpack(recv_exact(sock, BODY.size, "a request"))
        if op is Op.PING:
            sock.sendall(pack_answer(Answer(Status.OK)))
        elif op is Op.PROBE:
            n = min(length, MAX_PROBE_BYTES)
            sock.sendall(pack_answer(Answer(Status.OK, n, 0)))
            sock.sendall(filler(n))
        elif op is Op.PROBE_SHM:
            n = min(length, MAX_PROBE_BYTES)
            segment = _into_segment(BlockExport(length=n, checksum=0, data=filler(n)))
            segments.append(segment)
            sock.sendall(pack_answer(Answer(Status.OK, n, 0, segment.name)))
        elif op is Op.PUT:
            self._put(sock, block_id, length, digest)
        elif op is Op.PUT_SHM:
            self._put_shm(sock, block_id, length, digest)
        else:
            self._get(sock, block_id, op is Op.GET_SHM, segments)

    def _get(
        self,
        sock: socket.socket,
        block_id: str,
        shm: bool,
        segments: list[shared_memory.SharedMemory],
    ) -> None:
        try:
            export = self.server.source.export(block_id)
        except NotFound:
            sock.sendall(pack_answer(Answer(Status.NOT_FOUND)))
            return
        except VramancerError as exc:
            log.warning("fastpath: block %r cannot be read: %s", block_id, exc)
            sock.sendall(pack_answer(Answer(Status.ERROR)))
            return
        try:
            if shm:
                segment = _into_segment(export)
                segments.append(segment)
                answer = Answer(Status.OK, export.length, export.checksum, segment.name)
                sock.sendall(pack_answer(answer))
            else:
                sock.sendall(pack_answer(Answer(Status.OK, export.length, export.checksum)))
                if export.fd is not None:
                    send_file(sock, export.fd, export.offset, export.length)
                else:
                    assert export.data is not None
                    sock.sendall(export.data)
        finally:
            export.close()

    def _put(self, sock: socket.socket, block_id: str, length: int, digest: int) -> None:
        limit = self.server.max_put_bytes
        if length > limit:
            sock.sendall(pack_answer(Answer(Status.REFUSED)))
            raise FrameError(f"a PUT of {length} bytes (at most {limit})")
        body = recv_exact(sock, length, f"block {block_id!r}")
        if checksum(body) != digest:
            sock.sendall(pack_answer(Answer(Status.REFUSED)))
            raise FastpathError(f"block {block_id!r} arrived with a checksum mismatch")
        self._store(sock, block_id, bytes(body), digest)

    def _put_shm(self, sock: socket.socket, block_id: str, length: int, digest: int) -> None:
        if not is_loopback(self.client_address[0]) or not 8 < length <= 8 + 255:
            sock.sendall(pack_answer(Answer(Status.REFUSED)))
            raise FrameError("a PUT_SHM from another host, or with a bad body")
        body = bytes(recv_exact(sock, length, "a segment name"))
        (size,) = struct.unpack("<Q", body[:8])
        if size > self.server.max_put_bytes:
            sock.sendall(pack_answer(Answer(Status.REFUSED)))
            raise FrameError(f"a PUT_SHM of {size} bytes")
        try:
            segment = untracked(shared_memory.SharedMemory(name=body[8:].decode()))
        except (OSError, ValueError):
            sock.sendall(pack_answer(Answer(Status.REFUSED)))
            return
        try:
            if segment.size < size:
                sock.sendall(pack_answer(Answer(Status.REFUSED)))
                return
            data = bytes(buffer(segment)[:size])
        finally:
            segment.close()
        if checksum(data) != digest:
            sock.sendall(pack_answer(Answer(Status.REFUSED)))
            raise FastpathError(f"block {block_id!r} arrived with a checksum mismatch")
        self._store(sock, block_id, data, digest)

    def _store(self, sock: socket.socket, block_id: str, data: bytes, digest: int) -> None:
        try:
            self.server.source.put(block_id, data)
        except VramancerError as exc:
            log.warning("fastpath: block %r not stored: %s", block_id, exc)
            sock.sendall(pack_answer(Answer(Status.ERROR)))
            return
        sock.sendall(pack_answer(Answer(Status.OK, len(data), digest)))


def buffer(segment: shared_memory.SharedMemory) -> memoryview:
    """The segment's memory (typed: never None on an open segment)."""
    buf = segment.buf
    assert buf is not None
    return buf


def untracked(segment: shared_memory.SharedMemory) -> shared_memory.SharedMemory:
    """An attached segment that this process's resource tracker will not remove at exit (its
    creator does): Python before 3.13 tracks attached segments too."""
    with contextlib.suppress(Exception):
        from multiprocessing import resource_tracker

        resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    return segment


def _into_segment(export: BlockExport) -> shared_memory.SharedMemory:
    segment = shared_memory.SharedMemory(create=True, size=max(1, export.length))
    try:
        view = buffer(segment)[: export.length]
        if export.fd is not None:
            got = 0
            while got < export.length:
                k = os.preadv(export.fd, [view[got:]], export.offset + got)
                if k == 0:
                    raise FastpathError("the block file ended early")
                got += k
        else:
            assert export.data is not None
            view[:] = export.data
        view.release()
    except BaseException:
        _drop([segment])
        raise
    return segment


def _drop(segments: list[shared_memory.SharedMemory]) -> None:
    for segment in segments:
        with contextlib.suppress(OSError):
            segment.close()
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()
    segments.clear()


class FastpathServer(socketserver.ThreadingTCPServer):
    """Serves ``source``'s blocks on ``settings.host``:``settings.port`` (0: a free port)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, settings: FastpathSettings, source: BlockSource, max_put_bytes: int) -> None:
        if settings.secret is None and not is_loopback(settings.host):
            raise ValueError(
                f"[fastpath] host = {settings.host!r} needs [fastpath] secret "
                "(without one only loopback is served)"
            )
        self.settings = settings
        self.source = source
        self.max_put_bytes = max_put_bytes
        super().__init__((settings.host, settings.port or 0), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"{name}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="vrm-fastpath", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("fastpath: connection from %s failed", client_address, exc_info=True)
