"""The dashboard at ``/`` against a real ``vramancer serve``: the page is served without a token,
and every API path the page's script reads answers 200 with the shape the script expects."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.browser import chromium, dump_dom
from tests.helpers import ServerProcess, running_server

pytestmark = pytest.mark.integration

CONFIG = """
[auth]
tokens = { "view" = "viewer" }

[devices]
backends = []

[[devices.simulated]]
name = "sim0"
memory = "24GiB"
used = "6GiB"
"""
#: Paths the page fetches: ``api("/...")`` and ``fetch("/...")`` calls in its script.
_API_CALL = re.compile(r"""\b(?:api|fetch)\(\s*["'`](/[^"'`]+)["'`]""")
#: The top-level key each JSON route's body must have for the page to draw its table.
EXPECTED_KEYS = {
    "/v1/devices": "devices",
    "/v1/models": "models",
    "/v1/memory/tiers": "tiers",
    "/api/tasks/history": "tasks",
    "/v1/cluster/nodes": "nodes",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("dashboard"), CONFIG) as proc:
        yield proc


def page_paths(html: str) -> list[str]:
    return sorted(set(_API_CALL.findall(html)))


def test_the_page_is_served_without_a_token_and_names_its_api_paths(server: ServerProcess) -> None:
    with server.client() as client:
        page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    paths = page_paths(page.text)
    # The parser must find the page's calls, or the next test checks nothing.
    assert {p.split("?")[0] for p in paths} == {*EXPECTED_KEYS, "/v1/events"}


def test_every_path_the_page_reads_answers_200(server: ServerProcess) -> None:
    with server.client() as client:
        html = client.get("/").text
    with server.client("view") as client:
        for path in page_paths(html):
            route = path.split("?")[0]
            if route == "/v1/events":
                with client.stream("GET", path) as stream:
                    assert stream.status_code == 200, path
                    assert stream.headers["content-type"].startswith("text/event-stream")
                continue
            response = client.get(path)
            assert response.status_code == 200, (path, response.text)
            body = response.json()
            key = EXPECTED_KEYS[route]
            assert isinstance(body.get(key), list), (path, body)
        devices = client.get("/v1/devices").json()["devices"]
    sim = devices[0]
    # Fields the device rows read.
    for field in ("index", "name", "simulated", "memory_used_bytes", "memory_total_bytes"):
        assert field in sim, field
    assert sim["simulated"] is True and sim["memory_used_bytes"] == 6 * 1024**3


def test_without_a_token_the_api_calls_are_refused_not_the_page(server: ServerProcess) -> None:
    with server.client() as client:
        assert client.get("/").status_code == 200
        assert client.get("/v1/devices").status_code == 401


def test_the_script_reads_the_keys_the_routes_return(server: ServerProcess) -> None:
    """The page's tables are drawn from ``d.devices``, ``d.models``, ``d.tiers``, ``d.tasks``."""
    with server.client() as client:
        html = client.get("/").text
    for key in EXPECTED_KEYS.values():
        assert f"d.{key}" in html, key


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="no headless chromium on this machine")
def test_a_browser_draws_the_devices_tiers_and_tasks(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Runs the page's script in headless chromium against a server without tokens and checks
    the rendered DOM (not just the HTML text): rows for the simulated GPU, the tiers, the task."""
    config = CONFIG.replace('tokens = { "view" = "viewer" }', "")
    with running_server(tmp_path_factory.mktemp("browser"), config) as proc:
        with proc.client() as client:
            task = client.post("/api/tasks/submit", json={"type": "noop"}).json()["task_id"]
        profile = tmp_path_factory.mktemp("chromium-profile")
        out = dump_dom(proc.url + "/", profile)
    devices = _table(out, "devices")
    assert "Simulated GPU sim0" in devices and "simulated" in devices
    assert "6.0 GiB / 24.0 GiB" in devices
    assert "host RAM" in devices
    assert ">L4<" in _table(out, "tiers")
    assert task[:12] in _table(out, "tasks")
    assert 'id="status">live' in out, re.search(r'id="status"[^<]*', out)


def _table(dom: str, table_id: str) -> str:
    match = re.search(rf'<table id="{table_id}">(.*?)</table>', dom, re.S)
    assert match is not None, f"no table {table_id} in the rendered page"
    return match.group(1)
