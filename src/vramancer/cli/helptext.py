"""Command help as one flowing text per paragraph.

A command's help is its docstring, wrapped at the source's line length. The help screen wraps
it again at the terminal's width, and some typer versions keep the docstring's own line breaks
too, which leaves a paragraph cut in mid-sentence. ``reflow`` joins the lines of each paragraph
(a blank line still separates paragraphs; one that starts with ``\\b`` is kept as written).
"""

from __future__ import annotations

from typing import Any


def reflow_text(text: str) -> str:
    """Each paragraph of ``text`` on one line; blank lines between paragraphs kept."""
    paragraphs = text.split("\n\n")
    return "\n\n".join(
        p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
        for p in paragraphs
    )


def reflow(command: Any) -> None:
    """Reflow the help of ``command`` (a click command) and of every command under it."""
    if command.help:
        command.help = reflow_text(command.help)
    for sub in getattr(command, "commands", {}).values():
        reflow(sub)
