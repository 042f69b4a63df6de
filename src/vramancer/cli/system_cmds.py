"""CLI commands: ``vramancer status | top | recommend | can-load | optimize``.

They ask the server at ``VRM_URL``; when none answers (or with ``--embedded``), ``status``,
``top``, ``recommend`` and ``can-load`` poll this machine's devices themselves, once, and say
so on stderr. ``optimize`` acts on a running server only (optimising the CLI's own process
would free nothing anyone uses).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from vramancer.cli import forms
from vramancer.cli.common import (
    Api,
    ConfigOpt,
    JsonOpt,
    ServerUnreachable,
    call,
    console,
    emit,
    err_console,
    fail,
    load_settings,
)
from vramancer.clock import SystemClock
from vramancer.config import Settings
from vramancer.devices.holders import holders_by_gpu
from vramancer.devices.manager import DeviceManager
from vramancer.errors import VramancerError
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics
from vramancer.resources.estimator import estimate_from_file
from vramancer.resources.orchestrator import ResourceOrchestrator
from vramancer.units import MIB, format_size

#: ``can-load`` exits with this code when the model does not fit (errors exit with 1).
EXIT_DOES_NOT_FIT = 3

EmbeddedOpt = Annotated[
    bool,
    typer.Option("--embedded", help="Read this machine's devices directly, without a server."),
]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root vramancer app."""
    app.command("status")(status)
    app.command("top")(top)
    app.command("recommend")(recommend)
    app.command("can-load")(can_load)
    app.command("optimize")(optimize)


# -- embedded mode ---------------------------------------------------------------------------


class _Local:
    """Devices and the resource orchestrator of this machine, without a server or data dir."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(node=settings.node_name)
        self.devices = DeviceManager(
            settings.devices, events=EventBus(), metrics=self.metrics, clock=SystemClock()
        )
        self.resources = ResourceOrchestrator(
            settings.resources, self.devices, metrics=self.metrics
        )

    def report(self) -> dict[str, Any]:
        """The devices as this process sees them: nothing is reserved here (no server), so
        every GPU's used memory is external, with the processes the driver lists."""
        snap = self.devices.refresh()
        report = dict(self.devices.report())
        split = holders_by_gpu(snap.gpus, [])
        report["devices"] = [
            {**d, **split[d["index"]].as_dict()} if d["index"] in split else d
            for d in report["devices"]
        ]
        return report


@contextmanager
def _local(config: Path | None) -> Iterator[_Local]:
    local = _Local(load_settings(config))
    try:
        yield local
    except VramancerError as exc:
        fail(exc.message)
    finally:
        local.devices.close()


def _via_server_or_local(
    embedded: bool,
    config: Path | None,
    remote: Callable[[Api], Any],
    local: Callable[[_Local], Any],
) -> tuple[Any, str]:
    """Ask the server; without one (or with ``--embedded``) compute it here."""
    if not embedded:
        api = Api()
        try:
            return remote(api), "server"
        except ServerUnreachable:
            err_console.print(
                f"[dim]no VRAMancer server at {api.url}; reading this machine directly[/]"
            )
        finally:
            api.close()
    with _local(config) as here:
        return local(here), "embedded"


# -- rendering -------------------------------------------------------------------------------


def _bar(used: int, total: int) -> ProgressBar:
    ratio = used / total if total else 0.0
    style = "red" if ratio > 0.85 else "yellow" if ratio > 0.6 else "green"
    return ProgressBar(total=max(total, 1), completed=used, width=12, complete_style=style)


def _pair(used: int, total: int) -> str:
    """``20.0/24.0 GiB``: both numbers in the unit of the total."""
    unit, scale = ("GiB", 1024**3) if total >= 1024**3 else ("MiB", 1024**2)
    return f"{used / scale:.1f}/{total / scale:.1f} {unit}"


def _load(util: float | None, temp: float | None, power: float | None) -> str:
    parts = [
        f"{util:.0%}" if util is not None else "",
        f"{temp:.0f}°C" if temp is not None else "",
        f"{power:.0f}W" if power is not None else "",
    ]
    return " ".join(p for p in parts if p) or "–"


def memory_split(d: dict[str, Any]) -> str:
    """``used 6.0 GiB (driver) · reserved 6.0 GiB · external 0 B · total 24.0 GiB``."""
    return (
        f"used {format_size(d['memory_used_bytes'])} (driver) · "
        f"reserved {format_size(d.get('memory_reserved_bytes', 0))} · "
        f"external {format_size(d.get('memory_external_bytes', 0))} · "
        f"total {format_size(d['memory_total_bytes'])}"
    )


def age(since: float | None, now: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d`` since ``since`` (Unix seconds); ``–`` when unknown."""
    if since is None:
        return "–"
    seconds = max(0.0, now - since)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def holder_line(h: dict[str, Any], now: float) -> tuple[str, str, str]:
    """One holder: ``kind name``, its size, ``owner · age``."""
    owner = h.get("owner") or "–"
    ident = f" {h['id']}" if h["id"] != h["name"] and h["kind"] != "external" else ""
    pid = f" (pid {h['pid']})" if h.get("pid") is not None else ""
    return (
        f"{h['kind']:<10} {escape(str(h['name']))}{escape(ident)}{pid}",
        format_size(int(h["bytes"])),
        f"{escape(str(owner))} · {age(h.get('since'), now)}",
    )


def _holder_rows(table: Table, d: dict[str, Any]) -> None:
    """Under a GPU: its memory split, then who holds what (largest first)."""
    if "memory_reserved_bytes" not in d:
        return
    table.add_row("", f"[dim]{memory_split(d)}[/]", "", "", "")
    now = time.time()
    for h in d.get("holders", []):
        what, size, who = holder_line(h, now)
        style = "yellow" if h["kind"] == "external" else "cyan"
        table.add_row("", f"  [{style}]{what}[/]", "", size, f"[dim]{who}[/]")


def status_view(data: dict[str, Any]) -> RenderableType:
    """Devices with VRAM bars, then host memory and CPU (fits an 80-column terminal)."""
    table = Table(
        title=f"VRAMancer · {data.get('node', '?')}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("#", no_wrap=True)
    table.add_column("device", min_width=12, overflow="fold")
    table.add_column("memory", no_wrap=True)
    table.add_column("used/total", no_wrap=True, justify="right")
    table.add_column("util temp power", no_wrap=True)
    for d in data["devices"]:
        tag = "simulated" if d.get("simulated") else d["backend"]
        name = f"{escape(d['name'])} [dim]({escape(tag)})[/]"
        if d.get("error"):
            name += f" [red]error: {escape(d['error'])}[/]"
        table.add_row(
            str(d["index"]),
            name,
            _bar(d["memory_used_bytes"], d["memory_total_bytes"]),
            _pair(d["memory_used_bytes"], d["memory_total_bytes"]),
            _load(d.get("utilization_ratio"), d.get("temperature_celsius"), d.get("power_watts")),
        )
        _holder_rows(table, d)
    h = data["host"]
    used = h["memory_total_bytes"] - h["memory_available_bytes"]
    table.add_row(
        "–",
        f"host RAM [dim]({h.get('cpu_count', '?')} CPUs)[/]",
        _bar(used, h["memory_total_bytes"]),
        _pair(used, h["memory_total_bytes"]),
        _load(h.get("cpu_utilization_ratio"), None, None),
    )
    if h.get("swap_total_bytes"):
        table.add_row(
            "–",
            "swap",
            _bar(h["swap_used_bytes"], h["swap_total_bytes"]),
            _pair(h["swap_used_bytes"], h["swap_total_bytes"]),
            "",
        )
    parts: list[RenderableType] = [table]
    if data.get("cpu_only"):
        parts.append(Text("CPU-only mode: no GPU found.", style="yellow"))
    if data.get("pool"):
        parts.append(pool_view(data["pool"]))
    return Group(*parts)


def pool_view(nodes: list[dict[str, Any]]) -> RenderableType:
    """The other nodes of the pool: state, heartbeat age, running tasks, each GPU's VRAM."""
    table = Table(title="pool", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("node / device", min_width=16, overflow="fold")
    table.add_column("memory", no_wrap=True)
    table.add_column("used/total", no_wrap=True, justify="right")
    table.add_column("state", no_wrap=True)
    now = time.time()
    colours = {"up": "green", "stale": "yellow", "down": "red"}
    for node in nodes:
        age = max(0.0, now - float(node.get("last_heartbeat") or now))
        state = node.get("state", "?")
        table.add_row(
            f"[bold]{escape(node['name'])}[/]",
            "",
            "",
            f"[{colours.get(state, 'white')}]{state}[/] {age:.0f}s ago · "
            f"{node.get('running_tasks', 0)} running",
        )
        for dev in node.get("devices", []):
            tag = " [dim](simulated)[/]" if dev.get("simulated") else ""
            used, total = int(dev["memory_used_bytes"]), int(dev["memory_total_bytes"])
            table.add_row(f"  {escape(dev['id'])}{tag}", _bar(used, total), _pair(used, total), "")
    return table


def with_pool(api: Api) -> dict[str, Any]:
    """``/v1/devices``, and the pool's nodes (``pool``) when the server is in one."""
    data: dict[str, Any] = dict(api.get("/v1/devices"))
    nodes = (api.get_if_served("/v1/cluster/nodes") or {}).get("nodes", [])
    if any(node.get("name") != data.get("node") for node in nodes):
        data["pool"] = nodes
    return data


# -- commands --------------------------------------------------------------------------------


def status(
    json_out: JsonOpt = False, embedded: EmbeddedOpt = False, config: ConfigOpt = None
) -> None:
    """Devices with VRAM bars, and host memory (from the server, or this machine)."""
    data, source = _via_server_or_local(embedded, config, with_pool, lambda here: here.report())
    data["source"] = source
    emit(data, json_out, lambda d: console.print(status_view(d)))


def top(
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Show one refresh and exit.")] = False,
    count: Annotated[
        int | None, typer.Option(min=1, help="Exit after this many refreshes.")
    ] = None,
    json_out: JsonOpt = False,
    embedded: EmbeddedOpt = False,
    config: ConfigOpt = None,
) -> None:
    """A live view of devices and host memory (Ctrl-C quits).

    With --json: one JSON object per line per refresh."""
    limit = 1 if once else count
    fetch, close = _top_source(embedded, config)
    try:
        if json_out or once or not console.is_terminal:
            for n, data in enumerate(_ticks(fetch, interval, limit)):
                if json_out:  # JSON lines: one compact object per refresh
                    sys.stdout.write(json.dumps(data, default=str) + "\n")
                    sys.stdout.flush()
                else:
                    console.print(status_view(data))
                if limit is not None and n + 1 >= limit:
                    break
            return
        with Live(console=console, auto_refresh=False, screen=False) as live:
            for data in _ticks(fetch, interval, limit):
                live.update(status_view(data), refresh=True)
    except KeyboardInterrupt:
        return
    finally:
        close()


def _top_source(
    embedded: bool, config: Path | None
) -> tuple[Callable[[], dict[str, Any]], Callable[[], None]]:
    """A function returning fresh data each call (from the server, or polling this machine),
    and the one that releases what it holds (the HTTP client, or the drivers)."""
    if not embedded:
        api = Api()
        try:
            api.get("/v1/devices")
            return lambda: dict(call(lambda: with_pool(api))), api.close
        except ServerUnreachable:
            api.close()
            err_console.print(
                f"[dim]no VRAMancer server at {api.url}; reading this machine directly[/]"
            )
    here = _Local(load_settings(config))
    return here.report, here.devices.close


def _ticks(
    fetch: Callable[[], dict[str, Any]], interval: float, limit: int | None
) -> Iterator[dict[str, Any]]:
    n = 0
    while limit is None or n < limit:
        if n:
            time.sleep(interval)
        yield fetch()
        n += 1


def recommend(
    model: Annotated[str, typer.Argument(help="Model id, e.g. mistralai/Mistral-7B-v0.1")],
    params: Annotated[str | None, typer.Option(help="Parameter count, e.g. 7B or 350M.")] = None,
    file: Annotated[
        Path | None,
        typer.Option(help="A GGUF or safetensors file (or directory): its header gives the size."),
    ] = None,
    json_out: JsonOpt = False,
    embedded: EmbeddedOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Which quantization to use for MODEL on this machine, and why (memory, platform, GGUF)."""
    estimate = None
    gguf = False
    if file is not None:
        try:
            est = estimate_from_file(file)
        except VramancerError as exc:
            fail(f"--file: {exc.message}")
        estimate = est.as_dict()
        params = str(est.params)
        gguf = est.source == "gguf"
    query = {"model_id": model, "gguf": gguf} | ({"params": params} if params else {})
    data, source = _via_server_or_local(
        embedded,
        config,
        lambda api: api.get("/v1/models/recommend", params=query),
        lambda here: here.resources.recommend_quantization_method(
            model, params=params, gguf=gguf
        ).as_dict(),
    )
    data["source"] = source
    if estimate is not None:
        data["estimate"] = estimate

    def render(d: dict[str, Any]) -> None:
        console.print(
            f"[bold]{escape(d['method'])}[/] for {escape(model)}  [dim]({escape(d['platform'])})[/]"
        )
        console.print(escape(d["reason"]), highlight=False)
        if d.get("n_gpu_layers") is not None:
            console.print(
                f"llama.cpp Metal: n_gpu_layers={d['n_gpu_layers']}"
                + (", offload_kqv=True" if d.get("offload_kqv") else "")
            )
        if d.get("estimate"):
            e = d["estimate"]
            console.print(
                f"{escape(str(file))}: {e['params']:,} parameters, "
                f"weights {format_size(e['weights_bytes'])}"
                f" + KV cache {format_size(e['kv_cache_bytes'])} ({e['context_length']} tokens)"
                f" + overhead {format_size(e['overhead_bytes'])} = "
                f"[bold]{format_size(e['total_bytes'])}[/]"
            )

    emit(data, json_out, render)


def can_load(
    model: Annotated[str, typer.Argument(help="Model id.")],
    size: Annotated[
        str | None,
        typer.Option("--size", help="Expected size, e.g. 4GiB or 512MiB.", metavar="SIZE"),
    ] = None,
    size_mb: Annotated[
        float | None, typer.Option("--size-mb", help="Expected size in MiB (or --size).")
    ] = None,
    json_out: JsonOpt = False,
    embedded: EmbeddedOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Whether a model of --size (e.g. 4GiB) fits now, and where. Exits with 3 when it does
    not."""
    size_mb = _size_mb(size, size_mb)
    data, source = _via_server_or_local(
        embedded,
        config,
        lambda api: api.post(
            "/v1/models/can-load", json={"model_id": model, "estimated_size_mb": size_mb}
        ),
        lambda here: here.resources.can_load_model(model, size_mb).as_dict(),
    )
    data["source"] = source

    def render(d: dict[str, Any]) -> None:
        verdict = "[green]yes[/]" if d["can_load"] else "[red]no[/]"
        console.print(f"{verdict} — {escape(d['reason'])}", highlight=False)

    emit(data, json_out, render)
    if not data["can_load"]:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def _size_mb(size: str | None, size_mb: float | None) -> float:
    """The size ``--size`` or ``--size-mb`` gives, in MiB (the API's unit)."""
    if size is None and size_mb is None:
        fail("--size: the expected size is required (e.g. --size 4GiB; or --size-mb)", code=2)
    if size is not None and size_mb is not None:
        fail("--size and --size-mb: give one of them", code=2)
    if size is not None:
        return forms.size(size, "--size") / MIB
    assert size_mb is not None
    if not size_mb >= 0:
        fail(f"--size-mb: must be 0 or more (got {size_mb})", code=2)
    return size_mb


def optimize_summary(result: dict[str, Any]) -> str:
    """One line for ``optimize``'s answer: what was freed, or that nothing was (the server
    counts less than a mebibyte as the allocator's own churn, not as freed)."""
    freed = result.get("reclaimed_bytes", {})
    amounts = f"host {format_size(freed.get('host', 0))}, GPU {format_size(freed.get('gpu', 0))}"
    if result["optimized"]:
        return f"freed {amounts}"
    if freed.get("host") or freed.get("gpu"):
        return f"nothing to free ({amounts}: too little to count)"
    return "nothing to free"


def optimize(json_out: JsonOpt = False) -> None:
    """Ask the server to free memory: GC, allocator caches, idle models (operator role)."""
    with closing(Api()) as api:
        data = call(lambda: api.post("/v1/system/optimize"))

    def render(d: dict[str, Any]) -> None:
        console.print(optimize_summary(d), highlight=False)
        for action in d["actions_taken"]:
            console.print(f"  • {escape(action)}", highlight=False)

    emit(data, json_out, render)
