"""``vramancer serve``: the daemon (HTTP API, dashboard, metrics) on the embedded default."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Annotated

import typer

from vramancer.cli.common import ConfigOpt, fail, load_settings
from vramancer.config import Settings
from vramancer.errors import ConfigError


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_binding(settings: Settings) -> None:
    """Refuse a non-loopback address when no tokens are configured (everyone would be admin)."""
    host = settings.server.host
    if not settings.auth.tokens and not is_loopback(host):
        fail(
            f"refusing to listen on {host}: no API tokens are configured, so every caller "
            "would be admin. Add tokens under [auth] tokens in the config file, or listen on "
            "127.0.0.1.",
            code=2,
        )


def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (0: any free port).")] = None,
    config: ConfigOpt = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Run the VRAMancer daemon: HTTP API, dashboard and /metrics."""
    import uvicorn

    from vramancer.api.app import create_app

    base = load_settings(config)
    server = base.server.model_copy(
        update={k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    )
    settings = base.model_copy(update={"server": server})
    check_binding(settings)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = create_app(settings)
    except ConfigError as exc:  # checks across sections (a profile naming an unknown model)
        fail(exc.message, code=2)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        registry = app.state.runtime.metrics.registry
        start_http_server(settings.metrics_port, addr=server.host, registry=registry)
    uvicorn.run(app, host=server.host, port=server.port, log_level=log_level.lower())
