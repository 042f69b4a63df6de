"""The ``vramancer`` command. Each resource's commands live in their own module."""

from __future__ import annotations

import typer

from vramancer._version import __version__
from vramancer.cli import (
    alloc_cmds,
    completion_cmds,
    ha_cmds,
    helptext,
    journal_cmds,
    mcp_server,
    memory_cmds,
    models_cmds,
    parsing,
    pool_cmds,
    release_cmds,
    serve,
    system_cmds,
    tasks_cmds,
)

parsing.readable_help()
parsing.json_usage_errors()
app = typer.Typer(
    name="vramancer",
    help="VRAMancer: decides which models, jobs and data blocks live in which memory, and when.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """GPU and memory orchestrator for self-hosted AI workloads."""


app.command()(serve.serve)
system_cmds.register(app)
memory_cmds.register(app)
models_cmds.register(app)
tasks_cmds.register(app)
alloc_cmds.register(app)
pool_cmds.register(app)
journal_cmds.register(app)
ha_cmds.register(app)
release_cmds.register(app)
mcp_server.register(app)
completion_cmds.register(app)


def main() -> None:
    command = typer.main.get_command(app)
    helptext.reflow(command)
    command()
