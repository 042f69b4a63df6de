"""CLI commands: ``vramancer models list|load|unload|migrate`` and ``vramancer profile show|set``.

They talk to the running server (``VRM_URL``, token ``VRM_API_TOKEN``). Loads, moves and profile
switches can take a while (an 8 GB model): on a terminal a spinner shows the elapsed time and
the model's state as the server reports it; ``--json`` prints the server's answer only.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import httpx
import typer
from rich.markup import escape
from rich.table import Table

from vramancer.cli.common import Api, JsonOpt, call, console, emit
from vramancer.cli.tables import print_table
from vramancer.units import format_size

models_app = typer.Typer(help="Managed models: list, load, unload, migrate.", no_args_is_help=True)
profile_app = typer.Typer(
    help="Execution profile (idle, recording, autopilot ...): show, set.", no_args_is_help=True
)

#: Long operations: how long the CLI waits for the server's answer.
LONG_TIMEOUT_S = 900.0
#: Refresh period of the progress line.
POLL_S = 0.25

T = TypeVar("T")

DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        "-d",
        help="cpu, gpu (any GPU) or gpu:N (cuda:N: the same GPU); default: VRAMancer picks.",
    ),
]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root vramancer app."""
    app.add_typer(models_app, name="models")
    app.add_typer(profile_app, name="profile")


@contextmanager
def api_session(timeout: float = 30.0) -> Iterator[Api]:
    """A client for the running server (``VRM_URL``, ``VRM_API_TOKEN``), closed even when the
    command fails. Shared by the ``models``, ``profile`` and ``alloc`` commands."""
    api = Api(timeout=timeout)
    try:
        yield api
    finally:
        api.close()


def _path(name: str, action: str) -> str:
    return f"/v1/models/{quote(name, safe='/:')}/{action}"


def _with_progress(
    label: str, work: Callable[[], T], as_json: bool, poll: Callable[[], str] | None = None
) -> T:
    """Run ``work`` (a blocking HTTP call); on a terminal show a spinner with the elapsed time
    and, if given, what ``poll`` says (the model's state on the server)."""
    if as_json or not sys.stdout.isatty():
        result: T = call(work)
        return result
    with ThreadPoolExecutor(max_workers=1) as pool:
        future: Future[T] = pool.submit(call, work)
        started = time.monotonic()
        with console.status(label) as status:
            while not future.done():
                extra = ""
                if poll is not None:
                    try:
                        extra = f" ({poll()})"
                    except Exception:  # progress is best effort
                        extra = ""
                status.update(f"{label}{extra} {time.monotonic() - started:.1f} s")
                _wait(future, POLL_S)
        return future.result()


def _wait(future: Future[Any], timeout: float) -> None:
    done = threading.Event()
    future.add_done_callback(lambda _f: done.set())
    done.wait(timeout)


@contextmanager
def _poller() -> Iterator[httpx.Client]:
    """A quiet client for progress polls: a failed poll shows nothing (the main request
    reports errors)."""
    api = Api()
    client = httpx.Client(base_url=api.url, headers=_auth_headers(), timeout=2.0)
    api.close()
    try:
        yield client
    finally:
        client.close()


def _auth_headers() -> dict[str, str]:
    token = os.environ.get("VRM_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _state_poller(poller: httpx.Client, name: str) -> Callable[[], str]:
    def poll() -> str:
        response = poller.get(_path(name, "status"))
        if response.status_code != 200:
            return "waiting"
        data = response.json()
        device = data.get("device")
        return str(data["state"]) + (f" on {device}" if device else "")

    return poll


def _size(n: int | None) -> str:
    return format_size(n) if n else "-"


def _render_models(data: dict[str, Any]) -> None:
    if not data["models"]:
        console.print("no managed models: add [[models]] to the configuration", markup=False)
        console.print(f"profile: [bold]{data['profile']}[/]")
        return
    columns = ["name", "backend", "state", "device", "runs on", "VRAM", "priority", "last used"]
    errors = any(m.get("error") for m in data["models"])
    table = Table(*columns, "in use", *(["error"] if errors else []))
    for m in data["models"]:
        device = m["device"] or "-"
        if m["simulated"]:
            device += " (simulated)"
        table.add_row(
            m["name"] + (f" (as {m['variant']})" if m.get("variant") else ""),
            m["backend"],
            m["state"],
            device,
            m["runs_on"] or "-",
            _size(m["used_vram_bytes"] or m["vram_bytes"]),
            m["priority"],
            (m["last_used"] or "-")[:19],
            str(m["in_use"]),
            *([m.get("error") or ""] if errors else []),
        )
    print_table(console, table, keys=("name", "state"), give_way=("error", "last used"))
    console.print(f"profile: [bold]{data['profile']}[/]")
    if data.get("degraded_mode"):
        console.print(f"[yellow]degraded:[/] {escape(str(data['degraded_reason']))}")


def _describe(m: dict[str, Any], verb: str, elapsed_s: float) -> str:
    """One line for the model the server answered with: ``clip: moved to gpu:0 (simulated,
    runs on cpu) in 0.02 s``. The time is this command's, wait in the load queue included."""
    line = f"{m['name']}: {verb}"
    if m.get("device"):
        line += {"loaded": f" on {m['device']}", "moved": f" to {m['device']}"}.get(verb, "")
        if m.get("simulated"):
            line += f" (simulated, runs on {m['runs_on']})"
    return f"{line} in {elapsed_s:.2f} s"


def _render_one(verb: str, started: float) -> Callable[[dict[str, Any]], None]:
    def render(m: dict[str, Any]) -> None:
        console.print(_describe(m, verb, time.monotonic() - started), highlight=False)

    return render


@models_app.command("list")
def list_models(json_out: JsonOpt = False) -> None:
    """Managed models, their state, device and VRAM."""
    with api_session() as api:
        data = call(lambda: api.get("/v1/models"))
    emit(data, json_out, _render_models)


@models_app.command("load")
def load(name: str, device: DeviceOpt = None, json_out: JsonOpt = False) -> None:
    """Load NAME (on --device) and wait until it is loaded."""
    body = {"device": device} if device else {}
    started = time.monotonic()
    with api_session(LONG_TIMEOUT_S) as api, _poller() as poller:
        data = _with_progress(
            f"loading {name}",
            lambda: api.post(_path(name, "load"), json=body),
            json_out,
            _state_poller(poller, name),
        )
    emit(data, json_out, _render_one("loaded", started))


@models_app.command("unload")
def unload(name: str, json_out: JsonOpt = False) -> None:
    """Unload NAME (after its current users finish)."""
    started = time.monotonic()
    with api_session(LONG_TIMEOUT_S) as api, _poller() as poller:
        data = _with_progress(
            f"unloading {name}",
            lambda: api.post(_path(name, "unload")),
            json_out,
            _state_poller(poller, name),
        )
    emit(data, json_out, _render_one("unloaded", started))


@models_app.command("migrate")
def migrate(
    name: str,
    device: Annotated[
        str, typer.Argument(help="cpu, gpu (any GPU) or gpu:N (cuda:N: the same GPU)")
    ],
    json_out: JsonOpt = False,
) -> None:
    """Move NAME to DEVICE (torch models move in place; others are reloaded there)."""
    started = time.monotonic()
    with api_session(LONG_TIMEOUT_S) as api, _poller() as poller:
        data = _with_progress(
            f"moving {name} to {device}",
            lambda: api.post(_path(name, "migrate"), json={"device": device}),
            json_out,
            _state_poller(poller, name),
        )
    emit(data, json_out, _render_one("moved", started))


def _render_profile(data: dict[str, Any]) -> None:
    console.print(f"profile in force: [bold]{data['name']}[/]")
    table = Table("profile", "model", "placement")
    for profile, mapping in sorted(data["profiles"].items()):
        for model, placement in sorted(mapping.items()) or [("-", "-")]:
            table.add_row(profile + (" *" if profile == data["name"] else ""), model, placement)
    print_table(console, table, keys=("profile", "model", "placement"))
    last = data.get("last_switch")
    if last:
        console.print("last switch:")
        _render_switch(last)


def _render_switch(report: dict[str, Any]) -> None:
    if not report["steps"]:
        if not report.get("notes"):  # else the notes say why nothing moves
            console.print(f"every model is already where [bold]{report['name']}[/] wants it")
    else:
        table = Table("#", "step", "status", "time", "error")
        for i, step in enumerate(report["steps"]):
            status = step.get("status", "planned")
            took = f"{step['duration_s']:.2f} s" if "duration_s" in step else ""
            table.add_row(str(i), step["description"], status, took, step.get("error") or "")
        print_table(console, table, keys=("#", "status"), give_way=("error",))
    if report.get("dry_run"):
        console.print(f"plan for [bold]{report['name']}[/] (not run)")
    elif report.get("ok"):
        console.print(f"switched to [bold]{report['name']}[/] in {report['duration_s']:.2f} s")
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)


@profile_app.command("show")
def show(json_out: JsonOpt = False) -> None:
    """The profile in force, every profile's placements, the last switch."""
    with api_session() as api:
        data = call(lambda: api.get("/v1/profile"))
    emit(data, json_out, _render_profile)


@profile_app.command("set")
def set_profile(
    name: str,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan; change nothing.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Switch to profile NAME: free VRAM first (unload, move to CPU), then load."""
    with api_session(LONG_TIMEOUT_S) as api:
        data = _with_progress(
            f"switching to {name}",
            lambda: api.put("/v1/profile", json={"name": name, "dry_run": dry_run}),
            json_out,
        )
    emit(data, json_out, _render_switch)
