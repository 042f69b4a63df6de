"""The dashboard: one static page at ``/`` that reads the JSON API (no data of its own), with its
script at ``/dashboard.js`` and its style at ``/dashboard.css``.

The page holds no secrets; when tokens are configured it asks for one (kept in the tab's
``sessionStorage``) and sends it as a bearer token on every API call, so the page and its two
files need no auth. They are served with a Content-Security-Policy that lets the page load
nothing from another origin and run no inline script or style (everything it draws is built
with DOM calls, never from HTML strings).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(tags=["dashboard"])

#: The dashboard's files: URL path -> (file in ``vramancer/web``, media type).
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
#: Same-origin only; ``connect-src 'self'`` covers the API calls and the event stream.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # A new daemon version ships new files: the browser asks again (cheap, no data).
    "cache-control": "no-cache",
}


@cache
def _file(name: str) -> bytes:
    return resources.files("vramancer.web").joinpath(name).read_bytes()


def _serve(path: str) -> Response:
    name, media_type = FILES[path]
    return Response(_file(name), media_type=media_type, headers=HEADERS)


@router.get("/", include_in_schema=False)
async def dashboard() -> Response:
    """The live dashboard: GPUs with what holds them, tasks, models, allocations, tiers, events,
    and an operator's actions (cancel, logs, profile switch, load/unload)."""
    return _serve("/")


@router.get("/dashboard.js", include_in_schema=False)
async def dashboard_script() -> Response:
    """The dashboard's script."""
    return _serve("/dashboard.js")


@router.get("/dashboard.css", include_in_schema=False)
async def dashboard_style() -> Response:
    """The dashboard's style."""
    return _serve("/dashboard.css")
