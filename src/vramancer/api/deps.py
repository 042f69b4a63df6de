"""Request dependencies: the runtime, and who is calling with which role.

Bearer tokens map to roles (``[auth] tokens``). ``X-API-ROLE`` (seed 000) may narrow the
caller's role, never widen it. With no tokens configured every caller is admin, which is only
safe because ``vramancer serve`` then refuses to bind anything but loopback.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from vramancer.config import Role
from vramancer.runtime import Runtime


@dataclass(frozen=True)
class Principal:
    """The caller: its effective role and the key rate limiting uses."""

    role: Role
    token: str | None


async def get_runtime(request: Request) -> Runtime:
    """The app's runtime. ``async`` so FastAPI calls it inline, not in its thread pool."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


@functools.lru_cache(maxsize=1024)
def _loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _local_caller(request: Request) -> bool:
    """The peer is this machine: a loopback address, or a Unix socket (no address)."""
    client = request.client
    return client is None or _loopback_address(client.host)


def authenticate(request: Request) -> Principal:
    """Resolve the caller's role from its token, then narrow it by ``X-API-ROLE``.

    Without tokens every caller is admin, so only callers on this machine are let in, however
    the app is served (``vramancer serve`` also refuses to listen elsewhere; ``uvicorn
    --factory``, a container's port mapping or a proxy on another host would not)."""
    tokens: dict[str, Role] = request.app.state.runtime.settings.auth.tokens
    token = bearer_token(request)
    if tokens:
        if token is None:
            raise HTTPException(401, "a bearer token is required", headers=_UNAUTHORIZED)
        role = tokens.get(token)
        if role is None:
            raise HTTPException(401, "unknown token", headers=_UNAUTHORIZED)
    elif _local_caller(request):
        role = Role.ADMIN
    else:
        raise HTTPException(
            403,
            "no API tokens are configured, so only this machine may call this server "
            "(add tokens under [auth] tokens)",
        )
    asked = request.headers.get("x-api-role")
    if asked:
        try:
            narrowed = Role(asked.strip().lower())
        except ValueError:
            raise HTTPException(
                400, f"X-API-ROLE must be one of viewer, operator, admin (got {asked!r})"
            ) from None
        if narrowed.rank < role.rank:
            role = narrowed
    return Principal(role=role, token=token)


def require(needed: Role) -> Callable[[Request], Coroutine[Any, Any, Principal]]:
    """A dependency that lets the request through only with at least ``needed``."""

    async def dependency(request: Request) -> Principal:
        principal = authenticate(request)
        if not principal.role.allows(needed):
            raise HTTPException(
                403, f"this needs the {needed.value} role; the caller has {principal.role.value}"
            )
        return principal

    return dependency


Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
