"""``vramancer worker`` (a node of a pool: runs the tasks given to its GPUs) and ``vramancer
nodes`` (every node of the pool, its GPUs, heartbeat age and running tasks)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Annotated, Any

import typer

from vramancer.cli.common import Api, ConfigOpt, JsonOpt, call, emit, fail, load_settings, run_loop
from vramancer.cli.serve import LOG_LEVELS, configure_logging
from vramancer.errors import ConfigError
from vramancer.units import format_size

log = logging.getLogger(__name__)


def worker(
    config: ConfigOpt = None,
    nats: Annotated[
        str | None, typer.Option("--nats", help="NATS server(s), e.g. nats://hub:4222.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="This node's name in the pool (node_name).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    json_out: Annotated[bool, typer.Option("--json", help="Log one JSON object per line.")] = False,
) -> None:
    """Join a pool as a worker node: announce this host's GPUs, heartbeat, run the tasks the
    pool's orchestrator gives them. Stops cleanly on SIGTERM or Ctrl-C (running tasks go back
    to the queue)."""
    level = log_level.lower()
    if level not in LOG_LEVELS:
        fail(f"--log-level: must be one of {', '.join(LOG_LEVELS)} (got {log_level!r})", code=2)
    overrides: dict[str, Any] = {}
    if name is not None:
        overrides["node_name"] = name
    settings = load_settings(config, **overrides)
    if nats is not None:
        try:
            from vramancer.pool.settings import NatsSettings

            url = NatsSettings(url=nats).url
        except ValueError as exc:
            fail(f"--nats: {exc}", code=2)
        settings = settings.model_copy(
            update={"nats": settings.nats.model_copy(update={"url": url})}
        )
    if not settings.nats.enabled:
        fail("a worker needs a NATS server: --nats nats://HOST:4222 or [nats] url", code=2)
    configure_logging(level, json_out)
    try:
        run_loop(_run_worker(settings))
    except ConfigError as exc:
        fail(exc.message, code=2)


async def _run_worker(settings: Any) -> None:
    from vramancer.runtime import NodeRole, Runtime

    rt = Runtime(settings, role=NodeRole.WORKER)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await rt.start()
    gpus = len(rt.devices.snapshot().gpus)
    log.info("worker %s is in the pool with %d GPU(s); Ctrl-C stops it", settings.node_name, gpus)
    try:
        await stop.wait()
    finally:
        await rt.stop()
        log.info("worker %s left the pool", settings.node_name)


def nodes(json_out: JsonOpt = False) -> None:
    """Every node of the pool: state, GPUs, heartbeat age, running tasks."""
    data = call(lambda: Api().get("/v1/cluster/nodes"))
    emit(data, json_out, _render_nodes)


def _render_nodes(data: dict[str, Any]) -> None:
    now = time.time()
    for node in data.get("nodes", []):
        age = now - float(node.get("last_heartbeat") or now)
        typer.echo(
            f"{node['name']:<20} {node['state']:<6} heartbeat {age:5.1f} s ago  "
            f"running {node.get('running_tasks', 0)}"
        )
        for dev in node.get("devices", []):
            sim = " (simulated)" if dev.get("simulated") else ""
            used = format_size(int(dev.get("memory_used_bytes", 0)))
            total = format_size(int(dev.get("memory_total_bytes", 0)))
            typer.echo(f"    {dev['id']:<24} {dev.get('name', '')}{sim}  {used} / {total}")


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(nodes)
