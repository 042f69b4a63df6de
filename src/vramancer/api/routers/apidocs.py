"""The API reference at ``/docs``, with Swagger UI's script, style and icon served by this daemon.

FastAPI's own ``/docs`` page loads Swagger UI from a CDN, which leaves a blank page on a machine
without internet access. The files ship in the package (``vramancer/web/swagger``, Swagger UI
as published in the ``swagger-ui-dist`` npm package, Apache-2.0) and are served under
``/docs/static``. Like ``/openapi.json``, every path here needs a viewer when tokens are
configured (the guard middleware, and the routers' viewer dependency in ``api/app.py``).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)

#: Where the page finds its assets (same origin).
STATIC_PREFIX = "/docs/static"
#: The files served under :data:`STATIC_PREFIX` and their media types.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}


@cache
def _asset(name: str) -> bytes:
    return resources.files("vramancer.web").joinpath("swagger", name).read_bytes()


@router.get("/docs", response_class=HTMLResponse)
async def docs_page() -> HTMLResponse:
    """Swagger UI for ``/openapi.json``, loading nothing from another origin."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="VRAMancer API",
        swagger_js_url=f"{STATIC_PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{STATIC_PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{STATIC_PREFIX}/favicon-32x32.png",
        oauth2_redirect_url=None,
        # No badge that would send the schema to validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get(STATIC_PREFIX + "/{name}")
async def docs_asset(name: str) -> Response:
    """One of the page's files; any other name is a 404."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, f"no such file: {name[:100]}")
    return Response(
        _asset(name), media_type=media_type, headers={"cache-control": "public, max-age=86400"}
    )
