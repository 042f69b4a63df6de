"""CLI commands: ``vramancer ha status|promote`` (HA replication, over HTTP; see docs/ha.md).

``status`` prints the node's role, epoch, journal and peers (``--json``: the object of ``GET
/v1/ha/status``); ``promote`` turns a standby primary (admin; the epoch goes up by one).
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from vramancer.cli.common import JsonOpt, call, console, emit
from vramancer.cli.models_cmds import api_session
from vramancer.units import format_size

ha_app = typer.Typer(help="HA replication: status and manual promotion.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root vramancer app."""
    app.add_typer(ha_app, name="ha")


def _render(d: dict[str, Any]) -> None:
    if not d.get("enabled"):
        console.print("HA replication is off (VRM_HA_REPLICATION=1 turns it on)")
        return
    console.print(
        f"role {d['role']}, epoch {d['epoch']}, last seq {d['last_seq']}, "
        f"journal {format_size(d['journal_bytes'])}"
    )
    if d.get("primary"):
        console.print(f"primary: {d['primary']}")
    table = Table("peer", "acked seq", "lag", "state")
    for peer in d.get("peers", []):
        table.add_row(peer["address"], str(peer["acked_seq"]), str(peer["lag"]), peer["state"])
    console.print(table)


@ha_app.command("status")
def status(json_out: JsonOpt = False) -> None:
    """Role, epoch, journal size and each peer's lag."""
    with api_session() as api:
        data = call(lambda: api.get("/v1/ha/status"))
    emit(data, json_out, _render)


@ha_app.command("promote")
def promote(json_out: JsonOpt = False) -> None:
    """Turn this standby primary (manual failover; admin)."""
    with api_session() as api:
        data = call(lambda: api.post("/v1/ha/promote"))
    emit(data, json_out, _render)
