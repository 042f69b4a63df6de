"""How the command line is read, where typer's defaults mislead.

* ``CommandAfterDashes``: a command whose trailing argument is a command line to run
  (``submit``). An option the command does not know, written after the program name
  (``vramancer submit --vram 2GiB python -c 'print(1)'``), belongs to that program: the error
  says to put the program after ``--`` and shows the line that works.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from typer._click import Context
from typer._click.exceptions import NoSuchOption, UsageError
from typer.core import TyperCommand, TyperOption


def _option(command: TyperCommand, ctx: Context, word: str) -> TyperOption | None:
    """The option of ``command`` that ``word`` (``--name``, ``--name=value``, ``-n``) sets."""
    name = word.partition("=")[0]
    for param in command.get_params(ctx):
        if isinstance(param, TyperOption) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def program_start(command: TyperCommand, ctx: Context, args: Sequence[str]) -> int | None:
    """Where the program's own words start in ``args``: the first word that is neither one of
    the command's options nor an option's value. None when there is none, when ``--`` comes
    first, or when an option the command does not know comes first (a typo, not the
    program's)."""
    skip = False
    for i, word in enumerate(args):
        if skip:
            skip = False
        elif word == "--":
            return None
        elif word.startswith("-") and len(word) > 1:
            option = _option(command, ctx, word)
            if option is None:
                return None
            skip = "=" not in word and not option.is_flag and not option.count
        else:
            return i
    return None


class CommandAfterDashes(TyperCommand):
    """See the module docstring."""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        given = list(args)
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption as exc:
            start = program_start(self, ctx, given)
            if start is None:
                raise
            line = shlex.join([*given[:start], "--", *given[start:]])
            raise UsageError(
                f"No such option: {exc.option_name}. Options after the program name belong to "
                f"the program: put the command after `--`: {ctx.command_path} {line}",
                ctx,
            ) from None
