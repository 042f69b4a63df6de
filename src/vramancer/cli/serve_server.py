"""The uvicorn server of ``vramancer serve`` (imported only when the daemon starts: uvicorn is
not needed by the other commands)."""

from __future__ import annotations

import logging
import os
import socket
import time

import uvicorn

from vramancer.cli import daemon_record
from vramancer.config import Settings

log = logging.getLogger("vramancer.serve")


def base_url(host: str, port: int) -> str:
    """``http://host:port`` for people to open: a wildcard address becomes the loopback one."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class Server(uvicorn.Server):
    """uvicorn's server, which once it listens says where (dashboard, API docs, metrics) and
    records its pid and address in the data directory; the record goes as it stops."""

    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.settings = settings

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started or not self.servers or not self.servers[0].sockets:
            return
        port = int(self.servers[0].sockets[0].getsockname()[1])
        url = base_url(self.settings.server.host, port)
        metrics = (
            base_url(self.settings.server.host, self.settings.metrics_port) + "/metrics"
            if self.settings.metrics_port
            else url + "/metrics"
        )
        log.info("dashboard: %s/", url)
        log.info("API docs: %s/docs", url)
        log.info("metrics: %s", metrics)
        record = daemon_record.DaemonRecord(os.getpid(), url, time.time())
        try:
            daemon_record.write(self.settings.data_dir, record)
        except OSError as exc:
            log.warning("cannot record this daemon in %s: %s", self.settings.data_dir, exc)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Before the data directory's lock goes: a daemon started next writes its own record.
        daemon_record.remove(self.settings.data_dir, os.getpid())
        await super().shutdown(sockets)
