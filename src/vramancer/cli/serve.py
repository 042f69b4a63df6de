"""``vramancer serve``: the daemon (HTTP API, dashboard, metrics) on the embedded default."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vramancer.cli import daemon_record
from vramancer.cli.common import ConfigOpt, fail, load_settings
from vramancer.config import Settings
from vramancer.errors import ConfigError, Conflict, DataDirInUse

if TYPE_CHECKING:
    from fastapi import FastAPI


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


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line (``vramancer serve --json``), for log shippers and scripts."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    if as_json:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if level.lower() != "debug":
        # httpx logs every request at INFO: one line per Ollama probe (every 30 s) is noise.
        logging.getLogger("httpx").setLevel(logging.WARNING)


AccessLogOpt = Annotated[
    bool,
    typer.Option(
        "--access-log",
        help="Log every HTTP request (default: only 4xx and 5xx answers; "
        "[server] access_log in the config file).",
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data directory (default: $VRM_DATA_DIR, then the config)."),
]


def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    json_out: Annotated[
        bool, typer.Option("--json", help="Log one JSON object per line (uvicorn's lines too).")
    ] = False,
    access_log: AccessLogOpt = False,
) -> None:
    """Run the VRAMancer daemon: HTTP API, dashboard and /metrics."""
    import uvicorn

    level = log_level.lower()
    if level not in LOG_LEVELS:
        fail(f"--log-level: must be one of {', '.join(LOG_LEVELS)} (got {log_level!r})", code=2)
    overrides = {"data_dir": data_dir} if data_dir is not None else {}
    base = load_settings(config, **overrides)
    server = base.server.model_copy(
        update={k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    )
    settings = base.model_copy(update={"server": server})
    check_binding(settings)
    check_port_free(server.host, server.port)
    app = _build_app(settings)
    _start_metrics_port(app, settings)
    configure_logging(level, json_out)
    # With --json, uvicorn's loggers propagate to the root handler above instead of its own.
    log_config = None if json_out else uvicorn.config.LOGGING_CONFIG
    from vramancer.cli.serve_server import CoalescingH11Protocol, Server, StartupErrors

    wrapped = StartupErrors(app)
    uv_config = uvicorn.Config(
        wrapped,
        host=server.host,
        port=server.port,
        log_level=level,
        log_config=log_config,
        proxy_headers=bool(server.trusted_proxies),
        forwarded_allow_ips=forwarded_allow_ips(settings),
        http=CoalescingH11Protocol,
    )
    if not (access_log or server.access_log):
        logging.getLogger("uvicorn.access").addFilter(failed_requests_only)
    try:
        Server(uv_config, settings).run()
    except SystemExit:
        if wrapped.error is None:
            raise
        held = isinstance(wrapped.error, Conflict)  # DataDirInUse, the task queue's lock
        found = daemon_in_the_way(settings.data_dir) if held else None
        fail(found or wrapped.error.message, code=2)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on now, before the runtime starts (uvicorn finds
    out only after the whole daemon has started, then stops it again)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # uvicorn says what is wrong with the address
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return
            fail(
                f"cannot listen on {host}:{port}: another program listens there (is a "
                "VRAMancer daemon already running?); stop it, or choose another --port",
                code=2,
            )


def _build_app(settings: Settings) -> FastAPI:
    from vramancer.api.app import create_app

    try:
        return create_app(settings)
    except DataDirInUse as exc:
        fail(daemon_in_the_way(settings.data_dir) or exc.message, code=2)
    except ConfigError as exc:  # checks across sections (a profile naming an unknown model)
        fail(exc.message, code=2)


def daemon_in_the_way(data_dir: Path) -> str | None:
    """The one line that says which running daemon holds ``data_dir``; None when no running
    daemon says so (another VRAMancer command may hold it, e.g. ``memory recover``)."""
    found = daemon_record.read(data_dir)
    if found is None:
        return None
    return (
        f"another VRAMancer daemon (pid {found.pid}, {found.url}) is using the data directory "
        f"{data_dir}; stop it first, or give this one its own data directory (--data-dir or "
        "VRM_DATA_DIR)"
    )


def _start_metrics_port(app: FastAPI, settings: Settings) -> None:
    if not settings.metrics_port:
        return
    from prometheus_client import start_http_server

    registry = app.state.runtime.metrics.registry
    host = settings.server.host
    try:
        start_http_server(settings.metrics_port, addr=host, registry=registry)
    except OSError as exc:
        fail(
            f"VRM_METRICS_PORT: cannot listen on {host}:{settings.metrics_port} "
            f"({exc.strerror or exc})",
            code=2,
        )


def failed_requests_only(record: logging.LogRecord) -> bool:
    """The access log's filter without ``--access-log``: answers of 400 and over only (the
    dashboard polls every few seconds; its 200s would drown what the daemon does)."""
    args = record.args
    status = args[-1] if isinstance(args, tuple) and args else None
    return not isinstance(status, int) or status >= 400


def forwarded_allow_ips(settings: Settings) -> list[str] | None:
    """Where uvicorn believes ``X-Forwarded-For``/``-Proto`` from: ``[server] trusted_proxies``
    only, else nowhere (``proxy_headers`` is off then). uvicorn's own default believes them
    from 127.0.0.1, so any local process could pick the address it is rate limited and
    authorised by."""
    return list(settings.server.trusted_proxies) or None
