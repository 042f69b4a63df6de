"""CLI commands: ``vramancer journal verify|replay|stats`` (the HA replication journal, read
offline from ``<data_dir>/ha/journal``; nothing is changed, cut or applied).

``verify`` and ``replay`` check signatures, so they need the shared secret in
``VRM_HA_SECRET``; ``stats`` reads the record frames only and works without it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vramancer.cli.common import ConfigOpt, JsonOpt, console, emit, err_console, fail, load_settings
from vramancer.replication.delta import DeltaError, open_record
from vramancer.replication.journal_files import (
    iter_records,
    journal_dir,
    stats_directory,
    verify_directory,
)
from vramancer.replication.keys import KeyRing
from vramancer.replication.settings import MIN_SECRET_BYTES
from vramancer.units import format_size

journal_app = typer.Typer(
    help="HA replication journal: verify, replay, stats (reads only; changes nothing).",
    no_args_is_help=True,
)

DataDirOpt = Annotated[
    Path | None,
    typer.Option(help="Data directory (default: the configuration's, VRM_DATA_DIR)."),
]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root vramancer app."""
    app.add_typer(journal_app, name="journal")


def _directory(data_dir: Path | None, config: Path | None) -> Path:
    root = (data_dir or load_settings(config).data_dir).expanduser()
    directory = journal_dir(root)
    if not directory.is_dir():
        fail(f"--data-dir: no journal at {directory}", code=2)
    return directory


def _keyring() -> KeyRing:
    secret = os.environ.get("VRM_HA_SECRET", "").encode()
    if not secret:
        fail("VRM_HA_SECRET: not set; the journal's signatures are checked with it", code=2)
    if len(secret) < MIN_SECRET_BYTES:
        fail(
            f"VRM_HA_SECRET: at least {MIN_SECRET_BYTES} bytes are needed (got {len(secret)})",
            code=2,
        )
    return KeyRing(secret)


@journal_app.command("verify")
def verify(
    data_dir: DataDirOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False
) -> None:
    """Check every record: frame, signature (whatever its hour), payload, and the sequence (no
    gap, no repeat, epochs never decrease). Exit status 1 when anything is wrong."""
    directory = _directory(data_dir, config)
    report = verify_directory(directory, _keyring())

    def render(d: dict[str, Any]) -> None:
        span = f"seq {d['first_seq']}..{d['last_seq']}" if d["records"] else "no records"
        console.print(
            f"{directory}: {d['segments']} segments, {d['records']} records, "
            f"{format_size(d['bytes'])}, {span}"
        )
        for p in d["problems"]:
            seq = f"seq {p['seq']}" if p["seq"] is not None else "no seq"
            console.print(
                f"  {p['segment']} byte {p['offset']} ({seq}): {p['reason']}: {p['message']}",
                highlight=False,
            )
        console.print("ok" if d["ok"] else f"{len(d['problems'])} problems", highlight=False)

    emit(report.as_dict(), json_out, render)
    if not report.ok:
        raise typer.Exit(1)


@journal_app.command("replay")
def replay(
    from_seq: Annotated[int, typer.Option("--from", min=0, help="First seq printed.")] = 0,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Print each delta (seq, epoch, hour, kind, payload size), oldest first. It only reads:
    nothing is applied to any state. Records that fail their signature are named on stderr
    (exit status 1)."""
    directory = _directory(data_dir, config)
    keyring = _keyring()
    refused = 0
    for path, offset, record in iter_records(directory, after_seq=max(from_seq - 1, 0)):
        try:
            delta = open_record(record, keyring, now_hour=None)
        except DeltaError as exc:
            refused += 1
            err_console.print(f"{path.name} byte {offset}: {exc.reason}: {exc.message}")
            continue
        row = {
            "seq": delta.seq,
            "epoch": delta.epoch,
            "hour": delta.hour,
            "kind": delta.kind,
            "payload_bytes": len(delta.payload),
        }
        if json_out:
            sys.stdout.write(json.dumps(row) + "\n")
        else:
            sys.stdout.write(
                f"{delta.seq:>10} epoch {delta.epoch} hour {delta.hour} {delta.kind} "
                f"{len(delta.payload)} B\n"
            )
    if refused:
        raise typer.Exit(1)


@journal_app.command("stats")
def stats(data_dir: DataDirOpt = None, config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Segments, records, bytes, counts per kind and per codec, first and last seq, epoch
    (from the record frames; signatures are not checked, no secret needed)."""
    data = stats_directory(_directory(data_dir, config))

    def render(d: dict[str, Any]) -> None:
        console.print(
            f"{d['segments']} segments, {d['records']} records, {format_size(d['bytes'])}, "
            f"seq {d['first_seq']}..{d['last_seq']}, epoch {d['epoch']}",
            highlight=False,
        )
        table = Table("kind", "records")
        for kind, count in sorted(d["kinds"].items()):
            table.add_row(kind, str(count))
        console.print(table)
        console.print(
            "codecs: " + ", ".join(f"{k} {v}" for k, v in sorted(d["codecs"].items())),
            highlight=False,
        )

    emit(data, json_out, render)
