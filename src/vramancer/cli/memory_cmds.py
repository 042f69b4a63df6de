"""CLI commands: ``vramancer memory tiers|blocks|put|get|delete|evict`` (talk to a running server)
and ``vramancer memory recover`` (offline: rebuilds the catalog of a stopped store).

``put`` reads a file (or stdin with ``-``) and ``get`` writes a file (created 0600, never over
an existing one without ``--force``) or stdout, but not a terminal: binary bytes there would
garble it. Both show a progress bar for large blocks when the terminal is interactive.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO
from urllib.parse import quote

import httpx
import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from vramancer.cli import forms
from vramancer.cli.common import (
    Api,
    ConfigOpt,
    JsonOpt,
    call,
    console,
    emit,
    err_console,
    fail,
    load_settings,
    server_url,
)
from vramancer.cli.tables import print_table
from vramancer.errors import VramancerError
from vramancer.memory.recovery import rebuild
from vramancer.memory.tiers import TierName, tier_dir
from vramancer.units import count_of, format_size, parse_size

memory_app = typer.Typer(
    help="Tiered block store: tiers, blocks, put, get, delete, evict, recover.",
    no_args_is_help=True,
)

#: Blocks at least this big get a progress bar.
PROGRESS_MIN_BYTES = 8 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root vramancer app."""
    app.add_typer(memory_app, name="memory")


def _block_path(block_id: str) -> str:
    return "/v1/memory/blocks/" + quote(block_id, safe="/:")


def _progress(total: int | None, label: str) -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal or (total is not None and total < PROGRESS_MIN_BYTES),
    )


@memory_app.command("tiers")
def tiers(json_out: JsonOpt = False) -> None:
    """Each tier: capacity, use, blocks, latency."""
    data = _request("GET", "/v1/memory/tiers")

    def render(d: dict[str, Any]) -> None:
        # latency: the tier's relative cost ([memory.tiers.LN] latency), not a time.
        table = Table("tier", "used", "capacity", "use", "blocks", "rel. latency", "compression")
        for t in d["tiers"]:
            use = (
                f"{100 * t['used_bytes'] / t['capacity_bytes']:.0f}%"
                if t["capacity_bytes"]
                else "–"
            )
            table.add_row(
                t["name"],
                format_size(t["used_bytes"]),
                format_size(t["capacity_bytes"]),
                use,
                str(t["blocks"]),
                f"{t['latency']:g}",
                f"{t['compression_ratio']:.2f}x",
            )
        console.print(table)
        totals = d.get("totals", {})
        console.print(
            f"{count_of(totals.get('blocks', 0), 'block')} · "
            f"promotions {totals.get('promotions', 0)} · "
            f"demotions {totals.get('demotions', 0)} · evictions {totals.get('evictions', 0)}"
        )

    emit(data, json_out, render)


@memory_app.command("blocks")
def blocks(
    limit: Annotated[int, typer.Option(help="Blocks per page (1..1000).")] = 50,
    offset: Annotated[int, typer.Option(help="Blocks to skip.")] = 0,
    tier: Annotated[str | None, typer.Option(help="Only blocks of this tier (L1..L6).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List blocks (paged)."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if tier:
        params["tier"] = tier
    data = _request("GET", "/v1/memory/blocks", params=params)

    def render(d: dict[str, Any]) -> None:
        table = Table("id", "size", "tier", "pinned", "priority", "kind")
        for b in d["items"]:
            table.add_row(
                b["id"],
                format_size(b["size"]),
                b["tier"],
                "yes" if b["pinned"] else "",
                str(b["priority"]),
                b.get("kind", ""),
            )
        print_table(console, table, keys=("id", "tier"), give_way=("kind",))
        shown = d["offset"] + len(d["items"])
        more = f" (next: --offset {d['next_offset']})" if d.get("next_offset") is not None else ""
        console.print(f"{d['offset'] + 1 if d['items'] else 0}–{shown} of {d['total']}{more}")

    emit(data, json_out, render)


def _file_chunks(path: Path, progress: Progress) -> Iterator[bytes]:
    task = progress.add_task(f"put {path.name}", total=path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            progress.update(task, advance=len(chunk))
            yield chunk


@memory_app.command("put")
def put(
    block_id: Annotated[str, typer.Argument(help="Block id (letters, digits, . _ : / -).")],
    source: Annotated[str, typer.Argument(help="File to store, or - for stdin.")] = "-",
    priority: Annotated[
        str,
        typer.Option(
            help="0..1000 (higher stays up), or background (0), normal (250), high (500), "
            "user_facing (1000).",
            metavar="PRIORITY",
        ),
    ] = "0",
    hint: Annotated[str | None, typer.Option(help="Hint, e.g. 'kv' or 'dtype=bf16'.")] = None,
    durable: Annotated[
        bool | None,
        typer.Option(
            "--durable/--no-durable",
            help="Answer only once the block is on disk (L5/L6) and fsynced; default: the "
            "server's memory.durable_puts.",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Store a file (or stdin) as a block."""
    params: dict[str, Any] = {"priority": forms.priority_number(priority)}
    if hint:
        params["hint"] = hint
    if durable is not None:
        params["durable"] = "true" if durable else "false"
    if source == "-":
        body: Any = sys.stdin.buffer.read()
        data = _request("PUT", _block_path(block_id), params=params, content=body)
    else:
        path = Path(source)
        if not path.is_file():
            fail(f"source: {source} is not a readable file")
        size = path.stat().st_size
        headers = {"content-length": str(size), "content-type": "application/octet-stream"}
        with _progress(size, "put") as progress:
            data = _request(
                "PUT",
                _block_path(block_id),
                params=params,
                content=_file_chunks(path, progress),
                headers=headers,
            )

    def render(d: dict[str, Any]) -> None:
        durable = " (durable)" if d.get("durable") else ""
        console.print(f"stored {d['id']} ({format_size(d['size'])}) in {d['tier']}{durable}")

    emit(data, json_out, render)


def _request(method: str, path: str, **kwargs: Any) -> Any:
    """One JSON request to the server (errors become a one-line message, exit 1)."""
    api = Api(timeout=600.0)
    try:
        return call(lambda: api.request(method, path, **kwargs).json())
    finally:
        api.close()


def _url() -> str:
    return server_url()


def _client() -> httpx.Client:
    token = os.environ.get("VRM_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=_url(), headers=headers, timeout=600.0)


#: Where ``get`` writes when it has no ``--output`` (or ``-o -``).
STDOUT = "-"


def _response_error(response: httpx.Response) -> str:
    """The API's one-line error message for a failed answer (already read)."""
    try:
        message = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = response.text or response.reason_phrase
    return f"{message} (HTTP {response.status_code})"


def _check_output(output: str, force: bool, json_out: bool) -> None:
    """Refuse, before any request, a destination ``get`` must not write to."""
    if output == STDOUT:
        if json_out:
            fail("--json prints the block's metadata, so it needs --output FILE for the bytes")
        if sys.stdout.isatty():
            fail("refusing to write block bytes to a terminal: use -o FILE or a pipe", code=2)
    elif os.path.lexists(output) and not force:
        fail(f"--output: {output} already exists (add --force to overwrite it)", code=2)


def _open_output(output: str, force: bool) -> BinaryIO:
    """The file ``get`` writes, readable by its owner only (0600). Without ``force`` it must
    not exist yet (checked again here, at creation, not only before the request)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(output, flags, 0o600)
    except FileExistsError:
        fail(f"--output: {output} already exists (add --force to overwrite it)", code=2)
    except OSError as exc:
        fail(f"--output: cannot write {output}: {exc.strerror}")
    if force:
        os.fchmod(fd, 0o600)  # an overwritten file keeps its old mode otherwise
    return os.fdopen(fd, "wb")


def _copy_body(response: httpx.Response, sink: BinaryIO, block_id: str) -> int:
    """Stream the answer's bytes into ``sink``; the number of bytes written."""
    total = int(response.headers.get("content-length", "0")) or None
    written = 0
    with _progress(total, "get") as progress:
        task = progress.add_task(f"get {block_id}", total=total)
        for chunk in response.iter_bytes(CHUNK_BYTES):
            sink.write(chunk)
            written += len(chunk)
            progress.update(task, advance=len(chunk))
    sink.flush()
    return written


def _write_to_file(response: httpx.Response, output: str, force: bool, block_id: str) -> int:
    """Write the answer's bytes into the file ``output``; a failed copy removes the file."""
    with _open_output(output, force) as sink:
        try:
            return _copy_body(response, sink, block_id)
        except BaseException:
            sink.close()
            Path(output).unlink(missing_ok=True)
            raise


@memory_app.command("get")
def get(
    block_id: Annotated[str, typer.Argument(help="Block id.")],
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="File to write (created 0600), or - for stdout (a pipe, not a terminal).",
        ),
    ] = STDOUT,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite --output if it already exists.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a block's bytes to a file (or to stdout when it is a pipe or a file)."""
    _check_output(output, force, json_out)
    try:
        with _client() as client, client.stream("GET", _block_path(block_id)) as response:
            if response.status_code >= 400:
                response.read()
                fail(_response_error(response))
            if output == STDOUT:
                written = _copy_body(response, sys.stdout.buffer, block_id)
            else:
                written = _write_to_file(response, output, force, block_id)
            meta = {
                "id": block_id,
                "size": written,
                "tier": response.headers.get("x-vrm-tier"),
                "kind": response.headers.get("x-vrm-kind"),
                "output": output,
            }
    except httpx.TransportError as exc:
        fail(f"cannot reach VRAMancer at {_url()} ({exc.__class__.__name__})")
    if output != STDOUT:
        emit(
            meta,
            json_out,
            lambda d: err_console.print(
                f"wrote {format_size(d['size'])} of {d['id']} to {d['output']}"
            ),
        )


@memory_app.command("delete")
def delete(
    block_id: Annotated[str, typer.Argument(help="Block id.")],
    json_out: JsonOpt = False,
) -> None:
    """Remove a block from the store (operator role)."""
    try:
        with _client() as client:
            response = client.delete(_block_path(block_id))
    except httpx.TransportError as exc:
        fail(f"cannot reach VRAMancer at {_url()} ({exc.__class__.__name__})")
    if response.status_code == 404:
        fail(f"no block {block_id!r} to delete (HTTP 404)")
    if response.status_code >= 400:
        fail(f"cannot delete {block_id!r}: {_response_error(response)}")
    emit(response.json(), json_out, lambda d: console.print(f"deleted {d['id']}"))


@memory_app.command("evict")
def evict(
    tier: Annotated[str | None, typer.Option(help="Tier to free (L1..L6); all if omitted.")] = None,
    size: Annotated[
        str | None, typer.Option("--bytes", help="How much to free, e.g. 512MiB (needs --tier).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Forced eviction (admin role)."""
    body: dict[str, Any] = {}
    if tier:
        body["tier"] = tier
    if size is not None:
        if not tier:
            fail("--bytes needs --tier: which tier to free that much from (L1..L6)", code=2)
        try:
            body["bytes"] = parse_size(size)
        except ValueError as exc:
            fail(f"--bytes: {exc}", code=2)
    data = _request("POST", "/v1/memory/evict", json=body)

    def render(d: dict[str, Any]) -> None:
        console.print(f"evicted {count_of(d['moved'], 'block')} ({format_size(d['bytes'])})")

    emit(data, json_out, render)


@memory_app.command("recover")
def recover(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Data directory (default: the configuration's, VRM_DATA_DIR)."),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Rebuild the memory catalog (memory.sqlite) from the block files, VRAMancer stopped.

    The old catalog is moved aside (memory.sqlite.aside-<time>), never deleted; what it still
    says is kept where it can be read. Block files that cannot be read are moved into
    quarantine/ in their tier directory. Safe to run again."""
    settings = load_settings(config)
    root = (data_dir or settings.data_dir).expanduser()
    if not root.is_dir():
        fail(f"--data-dir: {root} is not a directory", code=2)
    tiers = {
        name.value: path
        for name in (TierName.L5, TierName.L6)
        if (path := tier_dir(settings.memory, name, root)) is not None
    }
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        "{task.completed}/{task.total} files",
        console=err_console,
        transient=True,
        disable=json_out or not err_console.is_terminal,
    ) as bar:
        task = bar.add_task("scanning block files", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            data = rebuild(root, tiers, fsync=settings.memory.fsync, progress=progress)
        except VramancerError as exc:
            fail(exc.message)
        except OSError as exc:
            fail(f"cannot recover {root}: {exc}")

    def render(d: dict[str, Any]) -> None:
        aside = ", ".join(d["moved_aside"]) or "none (there was no catalog)"
        console.print(f"old catalog moved aside: {aside}")
        console.print(
            f"catalog rebuilt: {count_of(d['blocks'], 'block')} ({format_size(d['bytes'])}), "
            f"{d['adopted']} from their block files, {d['carried_rows']} rows carried over"
        )
        for item in d["quarantined"]:
            console.print(
                f"quarantined {item['what']} {item['name']}: {item['reason']}", markup=False
            )
        if d["lost"]:
            console.print(
                f"{len(d['lost'])} rows named files that are gone: {', '.join(d['lost'])}"
            )
        if d["left"]:
            console.print(
                f"{len(d['left'])} rows kept: their tier directory is empty "
                "(is the disk mounted, the path right?)"
            )

    emit(data, json_out, render)
