"""How the command line is written, as a user types it: the program of ``submit`` after
``--``, help that shows what the parser takes, one way to write sizes and priorities, tables
that fit the terminal."""

from __future__ import annotations

import re

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
