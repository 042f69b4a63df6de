"""Who may call: the caller is resolved from the request's headers before anything reads its body.

A plain ASGI middleware (not ``BaseHTTPMiddleware``) in front of every route but the open ones
(``/healthz``, the dashboard page ``/``). FastAPI parses a JSON body before it runs a route's
dependencies, so an auth dependency alone would let a caller without a token make the server
read and parse a whole body first; here the refusal (a JSON 400, 401 or 403) goes out at once,
with ``Connection: close`` when a body was announced, so the unread body costs nothing.

In order:

* ``Authorization``, ``X-API-ROLE`` or ``Host`` given more than once: 400.
* ``Host`` (DNS rebinding): a web page on another site can make a browser send requests to a
  name that resolves to this machine; they carry that name as ``Host``. Without tokens only the
  loopback names (``localhost``, loopback addresses, any port) and ``[server] allowed_hosts`` are
  accepted; with tokens, ``allowed_hosts`` when it is set (loopback names always). Else 400
  ``host_not_allowed``.
* Browser cross-origin writes (POST, PUT, PATCH, DELETE): ``Sec-Fetch-Site: cross-site`` or
  ``same-site``, or an ``Origin`` whose host is neither the request's ``Host`` nor an allowed
  host: 403 ``cross_origin``. Clients that are not browsers send neither header.
* The bearer token (compared in constant time with every configured token): 401 without one
  or with an unknown one. Without tokens every caller on this machine is admin, others 403.
* ``X-API-ROLE`` narrows the role (never widens it); an unknown role name is a 400.

The resolved :class:`Principal` is kept in the ASGI scope, where the ``require(role)``
dependencies of ``api/deps.py`` find it.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from vramancer.config import Role

#: Routes anyone may call: liveness, the dashboard page and its script and style (which hold no
#: data), and the HA peer route, whose records carry their own signatures (``api/routers/ha.py``).
OPEN_PATHS = frozenset({"/healthz", "/", "/dashboard.js", "/dashboard.css", "/v1/ha/deltas"})
#: Where the middleware leaves the caller for the dependencies.
PRINCIPAL_KEY = "vramancer.principal"
#: Methods that change state, refused from another origin.
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Headers that must not be given twice (which copy would count is ambiguous).
SINGLE_HEADERS = {b"authorization": "Authorization", b"x-api-role": "X-API-ROLE", b"host": "Host"}
#: Host and Origin values are quoted in refusals up to this many characters.
QUOTE_CHARS = 100

_UNAUTHORIZED = {"www-authenticate": "Bearer"}


@dataclass(frozen=True)
class Principal:
    """The caller: its effective role and the key rate limiting uses."""

    role: Role
    token: str | None


class Refusal(Exception):
    """Why a request is refused before it reaches a route (status, error code, message)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        **details: str,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        #: Extra fields of the error object (``host`` for a refused Host).
        self.details = details


def match_token(raw: bytes, tokens: Iterable[str]) -> str | None:
    """The configured token equal to ``raw``, compared with every one in constant time."""
    found = None
    for token in tokens:
        if hmac.compare_digest(raw, token.encode("utf-8")):
            found = token
    return found


def bearer(raw: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` value, else None."""
    if raw is None or raw[:7].lower() != b"bearer ":
        return None
    token = raw[7:].strip()
    return token or None


@functools.lru_cache(maxsize=1024)
def loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name of a ``Host`` value or of an origin's authority, as ``allowed_hosts`` holds
    names: lower case, no port, no trailing dot, addresses in short form without brackets."""
    if len(value) > MAX_HOST_CHARS:  # no name of this server; kept out of the cache
        return value.lower()
    return _host_name(value)


#: Longer ``Host`` values name no server (a DNS name has at most 253 characters).
MAX_HOST_CHARS = 300


@functools.lru_cache(maxsize=1024)
def _host_name(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8470
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    value = value.removesuffix(".")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


def origin_authority(origin: str) -> str | None:
    """``host[:port]`` of an ``Origin`` header (``scheme://host[:port]``), None if opaque."""
    scheme, sep, rest = origin.partition("://")
    if not sep or not scheme or not rest or "/" in rest:
        return None
    return rest


def _quote(value: str) -> str:
    return repr(value if len(value) <= QUOTE_CHARS else value[:QUOTE_CHARS] + "...")


class Gate:
    """Resolves the caller of a request from its headers (see the module docstring)."""

    def __init__(self, tokens: Mapping[str, Role], allowed_hosts: Iterable[str] = ()) -> None:
        self.tokens = dict(tokens)
        self.hosts = frozenset(allowed_hosts)
        #: With tokens and no host list, any Host (a token is needed anyway).
        self.any_host = "*" in self.hosts or (bool(self.tokens) and not self.hosts)

    def named(self, name: str) -> bool:
        """``name`` is one of this server's names: loopback, or listed (``*`` lists all)."""
        if len(name) > MAX_HOST_CHARS:
            return "*" in self.hosts
        return (
            name == "localhost"
            or loopback_address(name)
            or name in self.hosts
            or ("*" in self.hosts)
        )

    def check(self, scope: Scope) -> Principal:
        """The caller of this request; raises :class:`Refusal`."""
        headers = _single_headers(scope.get("headers") or ())
        host = headers.get(b"host")
        self._check_host(host)
        if scope.get("method") in WRITE_METHODS:
            self._check_origin(headers, host)
        role, token = self._role(scope, headers.get(b"authorization"))
        asked = headers.get(b"x-api-role")
        if asked is not None and asked.strip():
            text = asked.decode("latin-1")
            try:
                narrowed = Role(text.strip().lower())
            except ValueError:
                raise Refusal(
                    400,
                    "bad_request",
                    f"X-API-ROLE must be one of viewer, operator, admin (got {_quote(text)})",
                ) from None
            if narrowed.rank < role.rank:
                role = narrowed
        return Principal(role=role, token=token)

    def _check_host(self, host: bytes | None) -> None:
        if host is None or self.any_host:  # no Host: not a browser (they always send one)
            return
        value = host.decode("latin-1")
        if not self.named(host_name(value)):
            raise Refusal(
                400,
                "host_not_allowed",
                f"Host {_quote(value)} is not a name of this server; requests must name it by "
                "a loopback name (localhost, 127.0.0.1, [::1]) or one of [server] allowed_hosts",
                host=value[:QUOTE_CHARS],
            )

    def _check_origin(self, headers: Mapping[bytes, bytes], host: bytes | None) -> None:
        site = headers.get(b"sec-fetch-site", b"").strip().lower()
        raw_origin = headers.get(b"origin")
        origin = raw_origin.decode("latin-1").strip() if raw_origin is not None else None
        authority = origin_authority(origin) if origin is not None else None
        own = host.decode("latin-1").strip().lower() if host is not None else None
        same_origin = authority is not None and authority.lower() == own
        if site == b"cross-site" or (site == b"same-site" and not same_origin):
            raise Refusal(
                403,
                "cross_origin",
                f"a web page of another site ({_quote(origin or 'unknown origin')}) may not "
                "change state on this server",
            )
        if origin is None or same_origin:
            return
        name = host_name(authority) if authority is not None else None
        own_name = host_name(own) if own is not None else None
        if name is None or (name != own_name and not self.named(name)):
            raise Refusal(
                403,
                "cross_origin",
                f"Origin {_quote(origin)} is not this server; a web page of another origin "
                "may not change state here",
            )

    def _role(self, scope: Scope, authorization: bytes | None) -> tuple[Role, str | None]:
        raw = bearer(authorization)
        if self.tokens:
            if raw is None:
                raise Refusal(401, "unauthorized", "a bearer token is required", _UNAUTHORIZED)
            token = match_token(raw, self.tokens)
            if token is None:
                raise Refusal(401, "unauthorized", "unknown token", _UNAUTHORIZED)
            return self.tokens[token], token
        client = scope.get("client")
        if client is None or loopback_address(client[0]):  # no address: a Unix socket
            return Role.ADMIN, raw.decode("latin-1") if raw is not None else None
        raise Refusal(
            403,
            "forbidden",
            "no API tokens are configured, so only this machine may call this server "
            "(add tokens under [auth] tokens)",
        )


def _single_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The headers as a dict; 400 when one of :data:`SINGLE_HEADERS` appears twice."""
    headers: dict[bytes, bytes] = {}
    for name, value in raw:
        if name in headers and name in SINGLE_HEADERS:
            shown = SINGLE_HEADERS[name]
            raise Refusal(400, "bad_request", f"the {shown} header is given more than once")
        headers[name] = value
    return headers


def body_announced(scope: Scope) -> bool:
    """The request carries a body the app has not read (a length over 0, or chunked)."""
    for name, value in scope.get("headers") or ():
        if name == b"content-length" and value.strip() not in (b"", b"0"):
            return True
        if name == b"transfer-encoding":
            return True
    return False


async def reply(
    send: Send,
    status: int,
    code: str,
    message: str,
    extra: Mapping[str, str] | None = None,
    *,
    close: bool = False,
    **details: Any,
) -> None:
    """A JSON error answer sent straight from a middleware (``{"error": {"code", ...}}``).

    ``close``: ask the server to close the connection after it, so a body the app never read
    is not received (uvicorn would otherwise read and discard it to keep the connection)."""
    body = json.dumps({"error": {"code": code, "message": message, **details}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """Refuses callers from their headers alone, before any route reads a body."""

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            principal = self.gate.check(scope)
        except Refusal as refused:
            await reply(
                send,
                refused.status,
                refused.code,
                refused.message,
                refused.headers,
                close=body_announced(scope),
                **refused.details,
            )
            return
        scope[PRINCIPAL_KEY] = principal
        await self.app(scope, receive, send)
