"""How the command line is read, where typer's defaults mislead.

* ``CommandAfterDashes``: a command whose trailing argument is a command line to run
  (``submit``). An option the command does not know, written after the program name
  (``vramancer submit --vram 2GiB python -c 'print(1)'``), belongs to that program: the error
  says to put the program after ``--`` and shows the line that works.
* ``readable_help``: help shows beside each option what the parser takes: nothing for a
  flag (``--json``, never ``--json true``), ``TEXT``, ``INTEGER``, ``NUMBER``, ``PATH`` for a
  value, and for a repeatable option the type of one value (give the option once per value).
  typer's own help shows ``<bool>``, ``<str>``, ``<list[str]>``, which the parser refuses;
  and a command's summary in the list of commands is one paragraph, not broken where its
  docstring's lines end. Help texts are plain text, not rich markup: a configuration
  section they cite (``[server] access_log``) shows as written.
* ``json_usage_errors``: a usage error (a missing argument, an unknown option) of a command
  line that asks for ``--json`` is printed as ``{"error": {"message": ...}}``, as every other
  error under ``--json`` is, not in a box.
"""

from __future__ import annotations

import inspect
import json
import re
import shlex
import sys
from collections.abc import Callable, Sequence

from rich.markup import escape
from typer import rich_utils
from typer._click import Context
from typer._click.exceptions import ClickException, NoSuchOption, UsageError
from typer.core import TyperCommand, TyperGroup, TyperOption, _TyperParameter


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


_Parse = Callable[..., list[str]]

#: Words for the value types that typer names after Python's.
_WORDS = {"str": "TEXT", "int": "INTEGER", "float": "NUMBER", "path": "PATH", "file": "FILE"}
_typer_display_type = _TyperParameter.display_type


def _value_type(param: _TyperParameter, ctx: Context) -> str:
    label = _typer_display_type(param, ctx).removeprefix("<").removesuffix(">")
    one = re.fullmatch(r"list\[(.*)\]", label)  # a repeatable option: one value's type
    label = one.group(1) if one else label
    return re.sub(r"[a-z]+", lambda m: _WORDS.get(m.group(0), m.group(0)), label)


def _option_type(option: TyperOption, ctx: Context) -> str | None:
    if option.metavar is not None:
        return option.metavar
    if option.is_flag or option.count:
        return None
    label = _value_type(option, ctx)
    return label + "..." if option.nargs != 1 else label


_typer_command_help = rich_utils._make_command_help


def _command_help(*, help_text: str, markup_mode: rich_utils.MarkupModeStrict) -> object:
    first = inspect.cleandoc(help_text).partition("\n\n")[0]
    if not first.startswith("\b"):
        help_text = " ".join(first.split())
    return _typer_command_help(help_text=help_text, markup_mode=markup_mode)


_typer_rich_text = rich_utils._make_rich_text


def _plain_rich_text(*, text: str, style: str = "", markup_mode: str) -> object:
    if markup_mode == rich_utils.MARKUP_MODE_RICH:
        text = escape(text)
    return _typer_rich_text(text=text, style=style, markup_mode=markup_mode)  # type: ignore[arg-type]


def readable_help() -> None:
    """See the module docstring. Applies to every typer command of this process."""
    rich_utils._make_rich_text = _plain_rich_text  # type: ignore[assignment]
    rich_utils._make_command_help = _command_help  # type: ignore[assignment]
    _TyperParameter.display_type = _value_type  # type: ignore[method-assign, assignment]
    TyperOption.display_type_rich = _option_type  # type: ignore[method-assign, assignment]


#: The key of a context's ``meta`` (shared by the whole command line) saying ``--json`` was given.
_JSON_ASKED = "vramancer.json"
_typer_format_error = rich_utils.rich_format_error


def _noting_json(parse: _Parse) -> _Parse:
    def parse_args(self: TyperCommand | TyperGroup, ctx: Context, args: list[str]) -> list[str]:
        options = args[: args.index("--")] if "--" in args else args
        if "--json" in options:
            ctx.meta[_JSON_ASKED] = True
        return parse(self, ctx, args)

    return parse_args


def _format_error(error: ClickException) -> None:
    ctx = getattr(error, "ctx", None)
    if ctx is not None and ctx.meta.get(_JSON_ASKED):
        sys.stderr.write(json.dumps({"error": {"message": error.format_message()}}) + "\n")
        sys.stderr.flush()
    else:
        _typer_format_error(error)


def json_usage_errors() -> None:
    """See the module docstring. Applies to every typer command of this process."""
    TyperCommand.parse_args = _noting_json(TyperCommand.parse_args)  # type: ignore[method-assign]
    TyperGroup.parse_args = _noting_json(TyperGroup.parse_args)  # type: ignore[method-assign]
    rich_utils.rich_format_error = _format_error  # type: ignore[assignment]
