"""CLI commands: ``vramancer alloc list|request|release|state`` (the VRAM arbiter, over HTTP).

``request`` asks the running server for VRAM (``vramancer alloc request llm 4GiB --priority
high``); the allocation stays until ``release`` (or until a higher priority preempts it).
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.table import Table

from vramancer.arbiter.types import Priority, WorkloadType
from vramancer.cli import forms
from vramancer.cli.common import JsonOpt, call, console, emit, fail
from vramancer.cli.models_cmds import api_session
from vramancer.cli.tables import print_table
from vramancer.devices.ids import DeviceId
from vramancer.units import format_size

alloc_app = typer.Typer(
    help="VRAM arbiter: list, request and release allocations.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root vramancer app."""
    app.add_typer(alloc_app, name="alloc")


#: What a quality figure means, printed under every listing that shows one.
QUALITY_NOTE = (
    "quality: 1.00 = full; lower means the GPU is under memory pressure and the workload "
    "should run lighter (lower precision, resolution or batch); --json gives quality_reason"
)


def _row(a: dict[str, Any]) -> list[str]:
    return [
        a["id"],
        a["workload_type"],
        a["priority"],
        format_size(a["memory_bytes"]),
        f"{a['quality_target']:.2f}",
        a.get("device") or "any",
        a.get("owner") or "",
    ]


@alloc_app.command("list")
def list_allocations(json_out: JsonOpt = False) -> None:
    """Live allocations and the budget they share."""
    with api_session() as api:
        data = call(lambda: api.get("/v1/allocations"))

    def render(d: dict[str, Any]) -> None:
        table = Table("id", "workload", "priority", "memory", "quality", "device", "owner")
        for allocation in d["allocations"]:
            table.add_row(*_row(allocation))
        print_table(console, table, keys=("id", "priority"), give_way=("owner",))
        console.print(
            f"{format_size(d['allocated_bytes'])} of {format_size(d['budget_bytes'])} granted, "
            f"{format_size(d['available_bytes'])} available"
        )
        if d["allocations"]:
            console.print(f"[dim]{QUALITY_NOTE}[/]", highlight=False)

    emit(data, json_out, render)


@alloc_app.command("request")
def request(
    workload_type: Annotated[
        WorkloadType, typer.Argument(help="llm, image, video, embedding or other.")
    ],
    memory: Annotated[str, typer.Argument(help="How much VRAM: bytes or '4GiB', '512MiB'.")],
    priority: Annotated[
        str,
        typer.Option(
            help="background, normal, high or user_facing, or a number 0..1000.",
            metavar="PRIORITY",
        ),
    ] = Priority.NORMAL.value,
    min_quality: Annotated[
        float | None, typer.Option(help="Refuse rather than run below this quality (0-1].")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="A GPU: gpu:N (cuda:N is the same GPU).")
    ] = None,
    owner: Annotated[str | None, typer.Option(help="Who holds it (shown in listings).")] = None,
    wait: Annotated[
        float, typer.Option(help="Seconds (at most 10) to wait for memory to free up (0: at once).")
    ] = 0.0,
    preempt: Annotated[
        bool, typer.Option(help="May take memory from strictly lower priorities.")
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    """Ask the arbiter for VRAM; prints the allocation (its id is what alloc release takes)."""
    size = forms.size(memory, "memory")
    word = forms.priority_word(priority)
    if min_quality is not None and not 0.0 < min_quality <= 1.0:
        fail(f"--min-quality must be in (0, 1], got {min_quality}", code=2)
    if not 0 <= wait <= 10:
        fail(f"--wait must be between 0 and 10 seconds, got {wait}", code=2)
    if device is not None:
        try:
            device = str(DeviceId.parse(device))
        except ValueError as exc:
            fail(str(exc), code=2)
    body: dict[str, Any] = {
        "workload_type": workload_type.value,
        "priority": word.value,
        "memory": size,
        "wait_s": wait,
        "preempt": preempt,
    }
    for key, value in (("min_quality", min_quality), ("device", device), ("owner", owner)):
        if value is not None:
            body[key] = value
    with api_session(timeout=max(30.0, wait + 10.0)) as api:
        data = call(lambda: api.post("/v1/allocations", json=body))

    def render(a: dict[str, Any]) -> None:
        console.print(
            f"granted [bold]{a['id']}[/]: {format_size(a['memory_bytes'])} for "
            f"{a['workload_type']} ({a['priority']}) on {a.get('device') or 'any GPU'}, "
            f"quality target {a['quality_target']:.2f}",
            highlight=False,
        )
        if a.get("quality_reason"):
            console.print(f"[dim]{escape(a['quality_reason'])}[/]", highlight=False)

    emit(data, json_out, render)


@alloc_app.command("release")
def release(
    allocation_id: Annotated[str, typer.Argument(help="The allocation id (alloc-N).")],
    json_out: JsonOpt = False,
) -> None:
    """Give an allocation's memory back."""
    with api_session() as api:
        data = call(lambda: api.delete("/v1/allocations/" + quote(allocation_id, safe="")))
    emit(data, json_out, lambda d: console.print(f"released {d['released']}", highlight=False))


@alloc_app.command("state")
def state(json_out: JsonOpt = False) -> None:
    """Budget, pressure, recommended quality per workload type, per-GPU use, counters."""
    with api_session() as api:
        data = call(lambda: api.get("/v1/arbiter"))

    def render(d: dict[str, Any]) -> None:
        s, stats = d["state"], d["stats"]
        console.print(
            f"budget {format_size(s['budget_bytes'])} · granted "
            f"{format_size(s['allocated_bytes'])} · pressure {s['pressure_ratio']:.0%} · "
            f"{len(s['allocations'])} allocation(s) · {s['waiters']} waiting",
            highlight=False,
        )
        table = Table("device", "budget", "granted", "external", "available")
        for dev in s["devices"]:
            table.add_row(
                dev["device"],
                format_size(dev["budget_bytes"]),
                format_size(dev["allocated_bytes"]),
                format_size(dev.get("external_bytes", 0)),
                format_size(dev["available_bytes"]),
            )
        if s["devices"]:
            console.print(table)
        qualities = ", ".join(f"{k} {v:.2f}" for k, v in s["qualities"].items())
        console.print(f"recommended quality: {qualities}", highlight=False)
        console.print(f"[dim]{QUALITY_NOTE}[/]", highlight=False)
        console.print(
            f"granted {stats['successful_allocations']} · refused {stats['failed_allocations']}"
            f" · preempted {stats['preemptions']} · released {stats['released']}",
            highlight=False,
        )

    emit(data, json_out, render)
