"""Every help screen, as a user reads it: value types in the parser's words, texts as written."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from vramancer.cli.main import app

runner = CliRunner()
#: typer's own type labels (Python's names), which the parser does not take as written.
PYTHON_TYPES = re.compile(r"<(bool|str|int|float|path|list\[[^>]*)>")


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "vramancer")
def test_help_names_value_types_as_the_parser_takes_them(path: tuple[str, ...]) -> None:
    done = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "Usage:" in done.output
    assert not PYTHON_TYPES.search(done.output), done.output


def test_help_cites_configuration_sections_as_written() -> None:
    assert len(COMMANDS) > 40  # every subcommand was visited
    done = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    text = " ".join(done.output.replace("│", " ").split())  # as read, whatever the width
    assert "[server] access_log in the config file" in text
