"""``vramancer serve``'s HTTP/1.1 writes: what one step of the event loop writes leaves in one
send (an answer's head with its body), over a real socket pair."""

from __future__ import annotations

import asyncio
import socket

from vramancer.cli.serve_server import _CoalescedWrites


async def _pair() -> tuple[_CoalescedWrites, socket.socket]:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, ours)
    return _CoalescedWrites(transport), peer  # type: ignore[arg-type]


def _received(peer: socket.socket) -> bytes:
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


async def test_writes_of_one_step_leave_together_at_its_end() -> None:
    writes, peer = await _pair()
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
    writes.write(head)
    writes.write(b"")
    writes.write(b"{}")
    assert _received(peer) == b""  # nothing left yet
    assert writes.get_write_buffer_size() == len(head) + 2
    await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert _received(peer) == head + b"{}"
    writes.write(b"next")  # a later step: its own send
    await asyncio.sleep(0.01)
    assert _received(peer) == b"next"
    writes.close()
    peer.close()


async def test_close_sends_what_is_pending_first_and_abort_drops_it() -> None:
    writes, peer = await _pair()
    writes.write(b"last words")
    writes.close()
    await asyncio.sleep(0.01)
    assert _received(peer) == b"last words"
    assert _received(peer) == b""  # then the end of the connection
    peer.close()
    writes, peer = await _pair()
    writes.write(b"dropped")
    writes.abort()
    await asyncio.sleep(0.01)
    assert peer.recv(100) == b""  # the end of the connection, without the bytes
    peer.close()
