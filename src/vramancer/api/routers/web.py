"""The dashboard: one static page at ``/`` that reads the JSON API (no data of its own).

The page holds no secrets; when tokens are configured it asks for one and sends it as a bearer
token on every API call, so the page itself needs no auth.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["dashboard"])


@cache
def _page() -> str:
    return resources.files("vramancer.web").joinpath("index.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The live dashboard: devices with VRAM bars, models, tiers, the queue and recent tasks."""
    return HTMLResponse(_page())
