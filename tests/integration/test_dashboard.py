"""The dashboard at ``/`` against a real ``vramancer serve``.

Over HTTP: the page, its script and its style are served without a token under a strict
Content-Security-Policy, and every API path the script reads answers 200 with the shape it reads.
In headless chromium (Playwright; skipped where chromium is missing): what a user sees and does:
the GPU panel with a running task and a loaded model as holders, the task row, the copy button,
the logs, cancelling and loading after a confirmation, the profile switch, readable events, a
layout that fits 1400 px, and a viewer's disabled buttons.

``DASHBOARD_SCREENSHOTS=docs`` makes the browser test save the screenshots of docs/dashboard.md.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import chromium
from tests.fakes.ollama import FakeOllama
from tests.helpers import ServerProcess, running_server, wait_for

pytestmark = pytest.mark.integration

GIB = 1024**3
MODEL = "llama3:8b"
OP, VIEW = "op-token", "view-token"
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
#: Paths the script reads: ``api("/...")`` and ``fetch("/...", ...)`` calls with a fixed path.
_API_CALL = re.compile(r"""\b(?:api|fetch)\(\s*["'`](/[^"'`]+)["'`]\s*[,)]""")
#: The top-level key each JSON route's body must have for the script to draw its part.
EXPECTED_KEYS = {
    "/v1/devices": "devices",
    "/v1/models": "models",
    "/v1/allocations": "allocations",
    "/v1/profile": "profiles",
    "/v1/memory/tiers": "tiers",
    "/api/tasks/history": "tasks",
    "/v1/cluster/nodes": "nodes",
    "/v1/gateway": "models",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("dashboard"), CONFIG) as proc:
        yield proc


def script_paths(script: str) -> list[str]:
    return sorted(set(_API_CALL.findall(script)))


def test_the_page_and_its_files_are_served_without_a_token_under_a_csp(
    server: ServerProcess,
) -> None:
    with server.client() as client:
        page = client.get("/")
        script = client.get("/dashboard.js")
        style = client.get("/dashboard.css")
        assert client.get("/v1/devices").status_code == 401
    assert page.status_code == script.status_code == style.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.headers["content-type"].startswith("text/css")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp
    # Nothing inline for the CSP to refuse, nothing from another origin.
    assert "<script>" not in page.text and "<style>" not in page.text
    assert 'style="' not in page.text
    assert "http://" not in page.text and "https://" not in page.text
    paths = script_paths(script.text)
    # The parser must find the script's calls, or the next test checks nothing.
    assert {p.split("?")[0] for p in paths} == {*EXPECTED_KEYS, "/v1/events"}


def test_every_path_the_script_reads_answers_200(server: ServerProcess) -> None:
    with server.client() as client:
        script = client.get("/dashboard.js").text
    with server.client("view") as client:
        for path in script_paths(script):
            route = path.split("?")[0]
            if route == "/v1/events":
                with client.stream("GET", path) as stream:
                    assert stream.status_code == 200, path
                    assert stream.headers["content-type"].startswith("text/event-stream")
                continue
            response = client.get(path)
            assert response.status_code == 200, (path, response.text)
            assert EXPECTED_KEYS[route] in response.json(), (path, response.text)
        devices = client.get("/v1/devices").json()["devices"]
    sim = devices[0]
    for field in ("index", "name", "simulated", "memory_used_bytes", "memory_total_bytes"):
        assert field in sim, field
    assert sim["simulated"] is True and sim["memory_used_bytes"] == 6 * GIB


# -- in a browser ---------------------------------------------------------------------------------


def browser_config(ollama_url: str, tokens: str = "") -> str:
    return f"""
{tokens}
[ollama]
endpoint = "{ollama_url}"

[tasks]
slots_per_device = 4

[devices]
backends = []

[[devices.simulated]]
name = "sim0"
memory = "24GiB"
used = "6GiB"

[[models]]
name = "{MODEL}"
backend = "ollama"
vram = "4GiB"
allowed_devices = ["gpu"]
idle_timeout_s = 600

[profiles.chat]
"{MODEL}" = "gpu"
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllama({MODEL: 4 * GIB}) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=binary, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[[str], Any]]:
    """Opens the dashboard at 1400x1000; fails the test on a script error or a CSP refusal."""
    contexts: list[Any] = []
    problems: list[str] = []

    def open_(url: str) -> Any:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
        page.on(
            "console",
            lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None,
        )
        page.goto(url + "/")
        # The first refresh is over: "live", or the error that stopped it.
        page.wait_for_function("() => !document.getElementById('status').textContent.includes('…')")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not problems, problems


def task_state(client: Any, task_id: str) -> str:
    state: str = client.get("/api/tasks/status", params={"task_id": task_id}).json()["state"]
    return state


def submit_sleep(client: Any) -> str:
    body = {"type": "cmd", "cmd": ["sleep", "120"], "vram": "2GiB", "gpu": 0}
    task_id: str = client.post("/api/tasks/submit", json=body).json()["task_id"]
    wait_for(lambda: task_state(client, task_id) == "running", timeout=30)
    return task_id


def confirm(page: Any, expect: str, *, yes: bool = True) -> str:
    """Answers the confirmation dialog, which must say ``expect``; returns what it said."""
    dialog = page.locator("#confirm")
    dialog.wait_for(state="visible")
    text: str = dialog.inner_text()
    assert expect in text, text
    page.locator("#confirm-yes" if yes else "#confirm-no").click()
    dialog.wait_for(state="hidden")
    return text


def no_sideways_scroll(page: Any) -> list[str]:
    """Sections whose content is wider than the section (a sideways scrollbar or clipping)."""
    found: list[str] = page.evaluate(
        """() => [...document.querySelectorAll('section:not([hidden]), table')]
          .filter((el) => el.scrollWidth > el.clientWidth + 1)
          .map((el) => `${el.id || el.className || el.tagName} ${el.scrollWidth}>${el.clientWidth}`)
          .concat(document.documentElement.scrollWidth > 1400 ? ['page'] : [])"""
    )
    return found


@pytest.mark.slow
def test_an_operator_watches_and_acts_from_the_page(
    tmp_path_factory: pytest.TempPathFactory,
    fake: FakeOllama,
    open_page: Callable[[str], Any],
) -> None:
    """No tokens, on loopback: every action works (after a confirmation)."""
    tmp = tmp_path_factory.mktemp("browser")
    with running_server(tmp, browser_config(fake.url)) as proc, proc.client() as client:
        sleeper = submit_sleep(client)
        body = {"type": "cmd", "cmd": ["echo", "hello from the task"]}
        echo = client.post("/api/tasks/submit", json=body).json()["task_id"]
        page = open_page(proc.url)
        assert "live" in page.locator("#status").inner_text()
        assert page.locator("#role").inner_text() == "operator"

        # The GPU panel: the running task holds gpu:0 with its 2 GiB, and the split is shown.
        gpu = page.locator('.gpu[data-gpu="0"]')
        holder = gpu.locator(f'tr[data-kind="task"][data-id="{sleeper}"]')
        holder.wait_for()
        assert "sleep 120" in holder.inner_text() and "2.0 GiB" in holder.inner_text()
        legend = gpu.locator(".legend").inner_text()
        assert "used (driver) 6.0 GiB of 24.0 GiB" in legend, legend
        assert "reserved by VRAMancer 2.0 GiB" in legend, legend
        # Used minus reserved, with no process to name: one unattributed external holder.
        assert "external 4.0 GiB" in legend, legend
        outside = gpu.locator('tr[data-kind="external"][data-id="unattributed"]').inner_text()
        assert "4.0 GiB" in outside, outside
        # The task row: command, VRAM, state, and its full id behind the copy button.
        row = page.locator(f'#tasks tr[data-task="{sleeper}"]')
        assert re.search(r"sleep 120\s+2\.0 GiB\s+running", row.inner_text()), row.inner_text()
        row.get_by_role("button", name="Copy").click()
        assert page.evaluate("navigator.clipboard.readText()") == sleeper

        # A task that cannot start says why in its row.
        body = {"type": "cmd", "cmd": ["true"], "vram": "20GiB", "gpu": 0}
        big = client.post("/api/tasks/submit", json=body).json()["task_id"]
        waiting = page.locator(f'#tasks tr[data-task="{big}"] td.s-waiting_gpu .reason')
        waiting.filter(has_text="needs 20.0 GiB").wait_for()
        client.post(f"/api/tasks/{big}/cancel")

        # Logs of the finished task, in a dialog.
        wait_for(lambda: task_state(client, echo) == "done", timeout=30)
        page.locator(f'#tasks tr[data-task="{echo}"]').get_by_role("button", name="Logs").click()
        page.locator("#logs-stdout").filter(has_text="hello from the task").wait_for()
        assert "attempt 1 of 1" in page.locator("#logs-meta").inner_text()
        page.locator("#logs-close").click()
        # A running task's logs are followed while the dialog is open.
        script = "echo first line; sleep 2; echo second line; sleep 120"
        body = {"type": "cmd", "cmd": ["sh", "-c", script]}
        talker = client.post("/api/tasks/submit", json=body).json()["task_id"]
        wait_for(lambda: task_state(client, talker) == "running", timeout=30)
        page.locator(f'#tasks tr[data-task="{talker}"]').get_by_role("button", name="Logs").click()
        page.locator("#logs-stdout").filter(has_text="first line").wait_for()
        page.locator("#logs-stdout").filter(has_text="second line").wait_for()
        assert "following" in page.locator("#logs-meta").inner_text()
        assert page.locator("#logs-stdout").inner_text().count("first line") == 1
        page.locator("#logs-close").click()
        client.post(f"/api/tasks/{talker}/cancel")

        # Cancel: saying no changes nothing; saying yes cancels (checked through the API).
        row.get_by_role("button", name="Cancel").click()
        confirm(page, f"Cancel task {sleeper}?", yes=False)
        assert task_state(client, sleeper) == "running"
        row.get_by_role("button", name="Cancel").click()
        confirm(page, "its process is killed")
        wait_for(lambda: task_state(client, sleeper) == "cancelled", timeout=30)
        row.locator("td.s-cancelled").wait_for()
        holder.wait_for(state="detached")

        # Load the model from its row: it becomes a holder of gpu:0.
        page.locator(f'#models tr[data-model="{MODEL}"]').get_by_role("button", name="Load").click()
        confirm(page, f"Load model {MODEL}?")
        gpu.locator(f'tr[data-kind="model"][data-id="{MODEL}"]').wait_for()
        assert client.get(f"/v1/models/{MODEL}/status").json()["state"] == "loaded"

        # Unload it from its holder row.
        gpu.locator(f'tr[data-kind="model"][data-id="{MODEL}"]').get_by_role(
            "button", name="Unload"
        ).click()
        confirm(page, f"Unload model {MODEL}?")
        gpu.locator(f'tr[data-kind="model"][data-id="{MODEL}"]').wait_for(state="detached")
        assert client.get(f"/v1/models/{MODEL}/status").json()["state"] == "unloaded"

        # Switch profile: the confirmation shows the plan (load the model), then it is done.
        page.locator("#profile-select").select_option("chat")
        page.locator("#profile-switch").click()
        confirm(page, "Switch from idle to chat?")
        page.locator("#notice").filter(has_text="profile chat in force").wait_for()
        assert client.get("/v1/profile").json()["name"] == "chat"
        assert client.get(f"/v1/models/{MODEL}/status").json()["state"] == "loaded"
        assert "chat (in force)" in page.locator("#profile-select").inner_text()

        # A gateway request streaming from the model shows in its row, then goes.
        cell = page.locator(f'#models tr[data-model="{MODEL}"] td[data-requests]')
        assert cell.get_attribute("data-requests") == "0/0"
        fake.chunk_delay_s = 0.5
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        try:
            with httpx.stream("POST", proc.url + "/ollama/api/chat", json=chat, timeout=60) as r:
                lines = r.iter_lines()
                next(lines)
                page.locator(f'#models tr[data-model="{MODEL}"] td[data-requests="1/0"]').wait_for()
                assert "1 in flight" in cell.inner_text()
                for _ in lines:
                    pass
        finally:
            fake.chunk_delay_s = 0.0
        page.locator(f'#models tr[data-model="{MODEL}"] td[data-requests="0/0"]').wait_for()

        # Events: one readable line each, no raw JSON.
        events = page.locator("#events")
        events.locator(".ev[data-kind=task_state]").filter(has_text="→ cancelled").first.wait_for()
        events.locator(".ev[data-kind=model_loaded]").filter(
            has_text="loaded on gpu:0"
        ).first.wait_for()
        events.locator(".ev[data-kind=mode_changed]").filter(has_text="idle → chat").wait_for()
        assert "{" not in events.inner_text()

        assert no_sideways_scroll(page) == []
        shots = os.environ.get("DASHBOARD_SCREENSHOTS")
        if shots:
            _screenshots(page, client, Path(shots))


def _screenshots(page: Any, client: Any, out: Path) -> None:
    """The pictures of docs/dashboard.md: a busy GPU, and the cancel confirmation."""
    task = submit_sleep(client)
    client.post("/api/tasks/submit", json={"type": "cmd", "cmd": ["sleep", "9"], "vram": "20GiB"})
    body = {"workload_type": "embedding", "memory": "1GiB", "device": "gpu:0", "owner": "notebook"}
    client.post("/v1/allocations", json=body)
    for i in range(4):
        client.put(f"/v1/memory/blocks/kv-cache-{i}", content=os.urandom(32 * 1024**2))
    time.sleep(20)  # a history for the sparkline
    page.locator(f'.gpu tr[data-kind="task"][data-id="{task}"]').wait_for()
    page.screenshot(path=str(out / "dashboard.png"), full_page=True)
    page.locator(f'#tasks tr[data-task="{task}"]').get_by_role("button", name="Cancel").click()
    page.locator("#confirm").wait_for(state="visible")
    page.screenshot(path=str(out / "dashboard-confirm.png"))
    page.locator("#confirm-yes").click()


@pytest.mark.slow
def test_a_viewer_sees_the_buttons_disabled_and_an_operator_token_enables_them(
    tmp_path_factory: pytest.TempPathFactory,
    fake: FakeOllama,
    open_page: Callable[[str], Any],
) -> None:
    tokens = f'[auth]\ntokens = {{ "{OP}" = "operator", "{VIEW}" = "viewer" }}'
    tmp = tmp_path_factory.mktemp("viewer")
    with running_server(tmp, browser_config(fake.url, tokens)) as proc, proc.client(OP) as op:
        task = submit_sleep(op)
        page = open_page(proc.url)
        assert "error: " in page.locator("#status").inner_text()
        assert page.locator("#role").inner_text() == "no token"

        page.locator("#token").fill(VIEW)
        page.locator("#token").dispatch_event("change")
        page.locator("#role").filter(has_text="viewer").wait_for()
        cancel = page.locator(f'#tasks tr[data-task="{task}"]').get_by_role("button", name="Cancel")
        cancel.wait_for()
        wait_for(lambda: cancel.is_disabled())
        assert "operator" in (cancel.get_attribute("title") or "")
        assert page.locator("#profile-switch").is_disabled()
        load = page.locator(f'#models tr[data-model="{MODEL}"]').get_by_role("button", name="Load")
        assert load.is_disabled()
        # The token is kept for the tab only.
        assert page.evaluate("sessionStorage.getItem('vramancer-token')") == VIEW
        assert page.evaluate("localStorage.length") == 0

        page.locator("#token").fill(OP)
        page.locator("#token").dispatch_event("change")
        page.locator("#role").filter(has_text="operator").wait_for()
        # 15 newer tasks: the running one stays listed (and cancellable).
        batch = {"tasks": [{"type": "cmd", "cmd": ["true"]} for _ in range(15)]}
        newer = op.post("/api/tasks/submit_batch", json=batch).json()["task_ids"]
        wait_for(lambda: all(task_state(op, t) == "done" for t in newer), timeout=60)
        page.locator("#tasks-note").filter(has_text="1 older running").wait_for()
        wait_for(lambda: cancel.is_enabled())
        cancel.click()
        confirm(page, f"Cancel task {task}?")
        wait_for(lambda: task_state(op, task) == "cancelled", timeout=30)


@pytest.mark.slow
def test_the_gpu_panel_shows_the_holders_and_split_a_server_reports(
    server: ServerProcess, open_page: Callable[[str], Any]
) -> None:
    """A server that reports ``memory_reserved_bytes``, ``memory_external_bytes`` and
    ``holders`` per device is shown as reported (nothing derived)."""
    holders = [
        {"kind": "external", "id": "pid:4242", "name": "Xorg", "owner": "gdm", "bytes": 3 * GIB,
         "since": None, "pid": 4242},
        {"kind": "allocation", "id": "alloc-9", "name": "batch embeddings", "owner": "notebook",
         "bytes": GIB, "since": time.time() - 90, "pid": None},
    ]  # fmt: skip

    def add_holders(route: Any) -> None:
        response = route.fetch()
        body = response.json()
        for device in body["devices"]:
            device.update(memory_reserved_bytes=GIB, memory_external_bytes=3 * GIB)
            device["holders"] = holders
        route.fulfill(response=response, json=body)

    page = open_page(server.url)
    page.route("**/v1/devices", add_holders)
    page.locator("#token").fill("view")
    page.locator("#token").dispatch_event("change")
    gpu = page.locator('.gpu[data-gpu="0"]')
    external = gpu.locator('tr[data-kind="external"][data-id="pid:4242"]')
    external.wait_for()
    assert re.search(r"Xorg\s+gdm\s+3\.0 GiB", external.inner_text()), external.inner_text()
    allocation = gpu.locator('tr[data-kind="allocation"][data-id="alloc-9"]').inner_text()
    assert re.search(r"batch embeddings\s+notebook\s+1\.0 GiB\s+1 min \d+ s", allocation), (
        allocation
    )
    legend = gpu.locator(".legend").inner_text()
    assert "reserved by VRAMancer 1.0 GiB" in legend and "external 3.0 GiB" in legend, legend
    assert "from allocations" not in legend
