"""A small keep-alive HTTP/1.1 client for the gateway's whole (non-streamed) answers.

The gateway sends one JSON ``POST`` to a model's server and waits for the whole answer; for
that, a general client (``httpx``) spends more time in its own layers than the model's server
takes to answer a short request. :class:`WholeClient` does only this, on asyncio streams:

* ``post_json(url, body)`` sends ``body`` with ``Content-Length`` over a kept-alive connection
  to ``url``'s host (one idle pool per host and port), reads the status line, the headers and
  the body (``Content-Length``, ``Transfer-Encoding: chunked``, or up to the end of the
  connection), and returns a :class:`WholeAnswer`;
* a connection comes back to its pool only after a complete answer that did not ask to close
  it; one that broke, was cancelled or timed out is closed;
* a request sent on a reused connection that the server had closed meanwhile (nothing at all
  came back) is sent once more on a new connection, as browsers do;
* only ``http://`` URLs: :func:`handles` says which ones; the gateway uses ``httpx`` for the
  rest and for streams.

Failures raise :class:`UpstreamError`: ``answered`` says whether a status line had come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass
from urllib.parse import urlsplit

#: Status line and headers, at most.
MAX_HEAD_BYTES = 64 * 1024
#: An answer's body, at most.
MAX_BODY_BYTES = 256 * 1024 * 1024
#: Idle connections kept per host and port.
MAX_IDLE = 64


class UpstreamError(Exception):
    """The exchange failed; ``answered``: a status line had come back before it did."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


@dataclass(frozen=True)
class WholeAnswer:
    status: int
    #: Header names in lower case (latin-1), values as sent.
    headers: dict[str, str]
    content: bytes


@functools.lru_cache(maxsize=256)
def _split(url: str) -> tuple[str, int, bytes, bytes] | None:
    """(host, port, Host header, request target) of an ``http://`` URL, else None."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.username or parts.password:
        return None
    try:
        port = parts.port or 80
    except ValueError:
        return None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, parts.netloc.encode("idna"), target.encode("ascii", "strict")


def handles(url: str) -> bool:
    """Whether :class:`WholeClient` can send to ``url`` (plain ``http://``)."""
    try:
        return _split(url) is not None
    except (UnicodeError, ValueError):
        return False


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class WholeClient:
    """See the module docstring. ``connect_timeout`` bounds opening a connection; ``read_timeout``
    bounds each wait for bytes from the server (the first byte of the answer included)."""

    def __init__(self, connect_timeout: float = 10.0, read_timeout: float = 600.0) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._closed = False

    async def post_json(self, url: str, body: bytes) -> WholeAnswer:
        """POST ``body`` (JSON bytes) to ``url`` and read the whole answer."""
        split = _split(url)
        if split is None:
            raise ValueError(f"not a plain http:// URL: {url!r}")
        host, port, host_header, target = split
        head = b"".join(
            (
                b"POST ",
                target,
                b" HTTP/1.1\r\nHost: ",
                host_header,
                b"\r\nAccept: application/json\r\nContent-Type: application/json\r\n"
                b"Content-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
            )
        )
        key = (host, port)
        conn, reused = self._idle_conn(key), True
        if conn is None:
            conn, reused = await self._connect(host, port), False
        try:
            answer, keep = await self._exchange(conn, head, body)
        except _ClosedBeforeAnswer:
            _close(conn)
            if not reused:
                raise UpstreamError("the server closed the connection without answering") from None
            conn = await self._connect(host, port)
            try:
                answer, keep = await self._exchange(conn, head, body)
            except _ClosedBeforeAnswer:
                _close(conn)
                raise UpstreamError("the server closed the connection without answering") from None
            except BaseException:
                _close(conn)
                raise
        except BaseException:
            _close(conn)
            raise
        if keep and not self._closed:
            self._put(key, conn)
        else:
            _close(conn)
        return answer

    async def aclose(self) -> None:
        """Close every idle connection; later answers close theirs."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                _close(conn)

    # -- connections -------------------------------------------------------------------------

    def _idle_conn(self, key: tuple[str, int]) -> _Conn | None:
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            reader, writer = conn
            if reader.at_eof() or writer.is_closing() or reader._buffer:  # type: ignore[attr-defined]
                _close(conn)  # closed by the server, or bytes nobody asked for
                continue
            return conn
        return None

    def _put(self, key: tuple[str, int], conn: _Conn) -> None:
        conns = self._idle.setdefault(key, [])
        if len(conns) >= MAX_IDLE:
            _close(conn)
        else:
            conns.append(conn)

    async def _connect(self, host: str, port: int) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD_BYTES)
        except TimeoutError:
            raise UpstreamError(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        return reader, writer

    # -- one exchange ------------------------------------------------------------------------

    async def _exchange(self, conn: _Conn, head: bytes, body: bytes) -> tuple[WholeAnswer, bool]:
        reader, writer = conn
        started = False
        try:
            writer.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                writer.write(body)
            async with asyncio.timeout(self.read_timeout) as deadline:
                await writer.drain()
                status_line = await reader.readline()
                if not status_line:
                    raise _ClosedBeforeAnswer
                started = True
                status, version = _status(status_line)
                headers = await self._headers(reader)
                deadline.reschedule(asyncio.get_running_loop().time() + self.read_timeout)
                content, until_eof = await self._body(reader, headers, deadline)
        except _ClosedBeforeAnswer:
            raise
        except (ConnectionResetError, BrokenPipeError) as exc:
            if not started:
                raise _ClosedBeforeAnswer from None
            raise UpstreamError(f"the answer broke off: {type(exc).__name__}", True) from None
        except TimeoutError:
            raise UpstreamError("the server did not answer in time") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            raise UpstreamError(
                f"the answer broke off: {type(e).__name__}", answered=True
            ) from None
        connection = headers.get("connection", "").lower()
        keep = not until_eof and "close" not in connection and version == b"HTTP/1.1"
        return WholeAnswer(status, headers, content), keep

    async def _headers(self, reader: asyncio.StreamReader) -> dict[str, str]:
        headers: dict[str, str] = {}
        size = 0
        while True:
            line = await reader.readline()
            size += len(line)
            if size > MAX_HEAD_BYTES:
                raise ValueError("headers too large")
            if line in (b"\r\n", b"\n"):
                return headers
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            name, sep, value = line.partition(b":")
            if not sep:
                raise ValueError("bad header line")
            key = name.strip().lower().decode("latin-1")
            text = value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text

    async def _body(
        self, reader: asyncio.StreamReader, headers: dict[str, str], deadline: asyncio.Timeout
    ) -> tuple[bytes, bool]:
        """The body and whether it ran up to the end of the connection."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await self._chunked(reader, deadline), False
        length = headers.get("content-length")
        if length is not None:
            size = int(length)
            if size < 0 or size > MAX_BODY_BYTES:
                raise ValueError("bad Content-Length")
            return await reader.readexactly(size), False
        out = bytearray()
        while chunk := await reader.read(65536):
            out += chunk
            if len(out) > MAX_BODY_BYTES:
                raise ValueError("body too large")
            deadline.reschedule(asyncio.get_running_loop().time() + self.read_timeout)
        return bytes(out), True

    async def _chunked(self, reader: asyncio.StreamReader, deadline: asyncio.Timeout) -> bytes:
        out = bytearray()
        while True:
            line = await reader.readline()
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            if len(out) + size > MAX_BODY_BYTES:
                raise ValueError("body too large")
            out += await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF
            deadline.reschedule(asyncio.get_running_loop().time() + self.read_timeout)


class _ClosedBeforeAnswer(Exception):
    """The connection ended before a single byte of the answer."""


def _status(line: bytes) -> tuple[int, bytes]:
    version, _, rest = line.partition(b" ")
    if not version.startswith(b"HTTP/1."):
        raise ValueError("not an HTTP/1.x answer")
    code = int(rest[:3])
    if not 100 <= code <= 599:
        raise ValueError("bad status")
    if code < 200:
        raise ValueError("informational answers are not supported")
    return code, version


def _close(conn: _Conn) -> None:
    with contextlib.suppress(Exception):
        conn[1].close()
