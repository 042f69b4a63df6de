"""``vramancer completion bash|zsh|fish``: print the shell completion script.

Load it with ``eval "$(vramancer completion bash)"`` (or save it where the shell looks for
completions, see docs/operations.md). The script calls ``vramancer`` back with
``_VRAMANCER_COMPLETE`` set, so completions follow the commands of the installed version.
"""

from __future__ import annotations

from enum import StrEnum

import typer
from typer._completion_shared import get_completion_script

#: The variable the generated script sets when it asks ``vramancer`` for completions.
COMPLETE_VAR = "_VRAMANCER_COMPLETE"


class Shell(StrEnum):
    """Shells a completion script can be printed for."""

    BASH = "bash"
    ZSH = "zsh"
    FISH = "fish"


def completion(
    shell: Shell = typer.Argument(..., help="The shell: bash, zsh or fish."),
) -> None:
    """Print the completion script for SHELL (eval "$(vramancer completion bash)")."""
    script = get_completion_script(
        prog_name="vramancer", complete_var=COMPLETE_VAR, shell=shell.value
    )
    typer.echo(script)


def register(app: typer.Typer) -> None:
    app.command()(completion)
