"""How the command line is written, as a user types it: the program of ``submit`` after
``--``, help that shows what the parser takes, one way to write sizes and priorities, tables
that fit the terminal."""

from __future__ import annotations

import re
from collections.abc import Iterator

import typer
import typer._click as click
from typer.testing import CliRunner

from vramancer.cli.main import app

runner = CliRunner()


def plain(text: str) -> str:
    """``text`` without rich's boxes, on one line."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_an_option_of_the_program_says_to_put_it_after_dashes() -> None:
    result = runner.invoke(app, ["submit", "--vram", "2GiB", "python", "-c", "print(1)"])
    assert result.exit_code == 2
    message = plain(result.stderr)
    assert "No such option: -c" in message
    assert "put the command after `--`: vramancer submit --vram 2GiB -- python -c 'print(1)'" in (
        message
    )
    # Short options run together, and --opt=value before the program.
    result = runner.invoke(app, ["submit", "--gpu=0", "ls", "-la"])
    assert "vramancer submit --gpu=0 -- ls -la" in plain(result.stderr)


def test_a_typo_in_submits_own_options_is_not_blamed_on_the_program() -> None:
    result = runner.invoke(app, ["submit", "--vram", "2GiB", "--wiat", "python"])
    assert result.exit_code == 2
    message = plain(result.stderr)
    assert "No such option: --wiat" in message and "--`" not in message


def commands(group: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(group, "commands", {}).items():
        yield from commands(sub, (*path, name))


def test_help_shows_what_the_parser_takes() -> None:
    seen = 0
    for path in commands(typer.main.get_command(app)):
        result = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, (path, result.output)
        types = re.findall(
            r"<(?:bool|str|int|float|list\[.*?\]|\w+ range|path|file)>", result.stdout
        )
        assert types == [], (path, types)
        seen += 1
    assert seen > 20
    submit = runner.invoke(app, ["submit", "--help"], terminal_width=200).stdout
    assert re.search(r"--vram +SIZE +VRAM it needs", submit)
    assert re.search(r"--env +KEY=VALUE +An environment variable", submit)
    assert re.search(r"--wait +Follow state", submit)  # a flag: no value shown
    assert re.search(r"--timeout +NUMBER", submit) and re.search(r"--node +TEXT", submit)
    # What help shows is what the parser takes: a flag alone, not `--json true`.
    refused = runner.invoke(app, ["tasks", "list", "--json", "true"])
    assert refused.exit_code == 2 and "unexpected extra argument" in plain(refused.stderr)
