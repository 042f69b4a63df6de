"""``/docs`` against a real ``vramancer serve``: the page and Swagger UI's files come from the
daemon itself (no CDN), need a viewer token like ``/openapi.json``, and a headless browser
without network access draws the list of operations."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.browser import chromium, dump_dom
from tests.helpers import ServerProcess, running_server

pytestmark = pytest.mark.integration

CONFIG = """
[auth]
tokens = { "view" = "viewer" }
"""
#: ``src="..."`` and ``href="..."`` in the page, and ``url: '...'`` (the schema Swagger UI loads).
_URL = re.compile(r"""(?:src|href)=["']([^"']+)["']|\burl:\s*["']([^"']+)["']""")
EXPECTED_TYPES = {
    "/docs/static/swagger-ui-bundle.js": "text/javascript",
    "/docs/static/swagger-ui.css": "text/css",
    "/docs/static/favicon-32x32.png": "image/png",
    "/openapi.json": "application/json",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("apidocs"), CONFIG) as proc:
        yield proc


def page_urls(html: str) -> set[str]:
    return {a or b for a, b in _URL.findall(html)}


def test_the_page_references_only_same_origin_files_that_answer(server: ServerProcess) -> None:
    with server.client("view") as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        urls = page_urls(page.text)
        assert urls == set(EXPECTED_TYPES), urls
        assert "http://" not in page.text and "https://" not in page.text
        for url in urls:
            assert not urlsplit(url).netloc, url
            response = client.get(url)
            assert response.status_code == 200, url
            assert response.headers["content-type"].startswith(EXPECTED_TYPES[url]), url
            assert len(response.content) > 500, url
        assert b"SwaggerUIBundle" in client.get("/docs/static/swagger-ui-bundle.js").content
        assert client.get("/docs/static/index.html").status_code == 404
        assert client.get("/docs/static/..%2Fswagger%2FLICENSE").status_code == 404


def test_the_page_and_its_files_need_a_viewer_token(server: ServerProcess) -> None:
    with server.client() as client:
        for path in ("/docs", *EXPECTED_TYPES):
            assert client.get(path).status_code == 401, path


@pytest.mark.skipif(chromium() is None, reason="no headless chromium on this machine")
def test_a_browser_without_network_draws_the_operations(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Every host but the daemon's resolves nowhere, so a CDN reference would leave the page
    blank; the DOM must hold Swagger UI's operation blocks for the API's paths."""
    tmp = tmp_path_factory.mktemp("apidocs-browser")
    with running_server(tmp) as proc:
        out = dump_dom(
            proc.url + "/docs",
            tmp / "profile",
            budget_ms=8000,
            extra=("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",),
        )
    assert 'class="swagger-ui' in out
    operations = re.findall(r'class="opblock opblock-(get|post|put|delete|patch)', out)
    assert len(operations) >= 10, out[-2000:]
    assert "/v1/devices" in out and "VRAMancer API" in out
