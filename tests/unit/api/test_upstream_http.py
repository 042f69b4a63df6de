"""The gateway's keep-alive client for whole answers, against real servers on free ports: a raw
asyncio HTTP server whose answers each test chooses, and the fake Ollama server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from tests.fakes.ollama import FakeOllama
from vramancer.api.upstream_http import UpstreamError, WholeClient, handles
from vramancer.units import GIB

Answer = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class RawServer:
    """Reads each request (head and Content-Length body), then runs ``answer``, which writes
    the answer and says whether to keep the connection."""

    answer: Answer
    port: int = 0
    connections: int = 0
    bodies: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.bodies.append(body)
                if not await self.answer(body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/generate"


@asynccontextmanager
async def raw_server(answer: Answer) -> AsyncIterator[RawServer]:
    server = RawServer(answer)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for writer in server.writers:
            writer.close()


def _echo(body: bytes) -> bytes:
    return json.dumps({"echo": json.loads(body)}).encode()


async def length_answer(body: bytes, writer: asyncio.StreamWriter) -> bool:
    out = _echo(body)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
    await writer.drain()
    return True


async def test_content_length_answers_reuse_one_connection() -> None:
    async with raw_server(length_answer) as server:
        client = WholeClient()
        for i in range(3):
            answer = await client.post_json(server.url, json.dumps({"n": i}).encode())
            assert answer.status == 200
            assert json.loads(answer.content) == {"echo": {"n": i}}
        await client.aclose()
    assert server.connections == 1


async def test_chunked_answer_is_put_together_and_connection_kept() -> None:
    async def chunked(body: bytes, writer: asyncio.StreamWriter) -> bool:
        out = _echo(body)
        half = len(out) // 2
        writer.write(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (out[:half], out[half:]):
            writer.write(b"%x;ext=1\r\n" % len(part) + part + b"\r\n")
        writer.write(b"0\r\nX-Trailer: 1\r\n\r\n")
        await writer.drain()
        return True

    async with raw_server(chunked) as server:
        client = WholeClient()
        for _ in range(2):
            answer = await client.post_json(server.url, b'{"a": 1}')
            assert (answer.status, json.loads(answer.content)) == (404, {"echo": {"a": 1}})
            assert answer.headers["transfer-encoding"] == "chunked"
        await client.aclose()
    assert server.connections == 1


async def test_answer_up_to_the_end_of_the_connection_is_not_reused() -> None:
    async def until_close(body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + _echo(body))
        await writer.drain()
        return False

    async with raw_server(until_close) as server:
        client = WholeClient()
        for i in range(2):
            answer = await client.post_json(server.url, json.dumps(i).encode())
            assert json.loads(answer.content) == {"echo": i}
        await client.aclose()
    assert server.connections == 2


async def test_kept_connection_closed_by_the_server_is_replaced() -> None:
    async with raw_server(length_answer) as server:
        client = WholeClient()
        await client.post_json(server.url, b"1")
        for writer in server.writers:  # the server drops its idle connection
            writer.close()
        await asyncio.sleep(0.05)
        answer = await client.post_json(server.url, b"2")
        assert json.loads(answer.content) == {"echo": 2}
        await client.aclose()
    assert server.connections == 2
    assert server.bodies == [b"1", b"2"]


async def test_server_closing_without_answer_on_a_reused_connection_is_retried_once() -> None:
    calls = 0

    async def second_drops(body: bytes, writer: asyncio.StreamWriter) -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:
            return False  # closes the kept connection after reading the request
        return await length_answer(body, writer)

    async with raw_server(second_drops) as server:
        client = WholeClient()
        await client.post_json(server.url, b"1")
        answer = await client.post_json(server.url, b"2")
        assert json.loads(answer.content) == {"echo": 2}
        await client.aclose()
    assert server.bodies == [b"1", b"2", b"2"]


async def test_answer_broken_off_is_an_error_and_never_sent_again() -> None:
    async def broken(body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial')
        await writer.drain()
        return False

    async with raw_server(broken) as server:
        client = WholeClient()
        with pytest.raises(UpstreamError) as caught:
            await client.post_json(server.url, b"{}")
        assert caught.value.answered
        await client.aclose()
    assert server.bodies == [b"{}"]


async def test_nothing_listening_is_an_error_without_answer() -> None:
    async with raw_server(length_answer) as server:
        url = server.url
    client = WholeClient(connect_timeout=2)
    with pytest.raises(UpstreamError, match="cannot connect") as caught:
        await client.post_json(url, b"{}")
    assert not caught.value.answered


async def test_a_server_that_says_nothing_times_out() -> None:
    async def silent(body: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    async with raw_server(silent) as server:
        client = WholeClient(read_timeout=0.2)
        with pytest.raises(UpstreamError, match="in time"):
            await client.post_json(server.url, b"{}")
        await client.aclose()


def test_only_plain_http_urls_are_handled() -> None:
    assert handles("http://127.0.0.1:11434/api/generate")
    assert handles("http://[::1]:8000/v1/completions?x=1")
    assert not handles("https://example.com/api/generate")
    assert not handles("http://user:pw@host/api")
    assert not handles("http://host:notaport/api")


async def test_fake_ollama_whole_answer() -> None:
    with FakeOllama({"m:1b": 1 * GIB}, keep_alive=True) as fake:
        client = WholeClient()
        body = {"model": "m:1b", "prompt": "hello", "stream": False}
        for _ in range(2):
            answer = await client.post_json(fake.url + "/api/generate", json.dumps(body).encode())
            data = json.loads(answer.content)
            assert answer.status == 200
            assert data["done"] is True and data["model"] == "m:1b"
        missing = {"model": "nope", "prompt": "x", "stream": False}
        answer = await client.post_json(fake.url + "/api/generate", json.dumps(missing).encode())
        assert answer.status == 404 and "not found" in json.loads(answer.content)["error"]
        await client.aclose()
