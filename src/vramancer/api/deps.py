"""Request dependencies: the runtime, and who is calling with which role.

Bearer tokens map to roles (``[auth] tokens``). ``X-API-ROLE`` may narrow the
caller's role, never widen it. With no tokens configured every caller on this machine is admin
(``vramancer serve`` then refuses to bind anything but loopback). The caller is resolved by the
middleware of ``api/guard.py`` from the headers alone, before any body is read; the
dependencies here only check its role.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from vramancer.api.guard import PRINCIPAL_KEY, Gate, Principal, Refusal, bearer
from vramancer.config import Role
from vramancer.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    """The app's runtime. ``async`` so FastAPI calls it inline, not in its thread pool."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def bearer_token(request: Request) -> str | None:
    raw = bearer(request.headers.get("authorization", "").encode("latin-1"))
    return raw.decode("latin-1") if raw is not None else None


def _gate(request: Request) -> Gate:
    gate: Gate | None = getattr(request.app.state, "gate", None)
    if gate is None:
        settings = request.app.state.runtime.settings
        gate = Gate(settings.auth.tokens, settings.server.allowed_hosts)
        request.app.state.gate = gate
    return gate


def authenticate(request: Request) -> Principal:
    """The caller, as ``api/guard.py``'s middleware resolved it before the body was read.

    (Resolved here from the headers, by the same rules, when the app runs without that
    middleware.) Without tokens every caller is admin, so only callers on this machine are let
    in, however the app is served (``vramancer serve`` also refuses to listen elsewhere;
    ``uvicorn --factory``, a container's port mapping or a proxy on another host would not)."""
    principal = request.scope.get(PRINCIPAL_KEY)
    if isinstance(principal, Principal):
        return principal
    try:
        return _gate(request).check(request.scope)
    except Refusal as refused:
        raise HTTPException(refused.status, refused.message, headers=refused.headers) from None


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
