"""Tables that fit the terminal without cutting what the user acts on.

``print_table(table, keys=..., give_way=...)`` prints a rich ``Table`` within the console's
width (the terminal's, or ``COLUMNS``):

* a table too wide as drawn is first drawn lighter (no edges, a space between columns);
* key columns (an id, a name, a state: what other commands take or what a row is about) keep
  their full width and never wrap;
* when the table is too wide, the ``give_way`` columns (a command line, free text), in the order
  given, are cut first with an ellipsis, down to ``MIN_GIVE_WAY`` characters, one line per
  row; then the other columns wrap at spaces, widest first; then the ``give_way`` columns
  are cut further, and only then the other columns break within words (at least
  ``MIN_FOLD`` characters stay of each column, or one where that keeps the keys whole).

On a terminal too narrow for the key columns themselves (a block id longer than the
terminal), the keys break across lines, widest first, each whole; nothing is cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

#: The narrowest a ``give_way`` column becomes before other columns wrap.
MIN_GIVE_WAY = 12
#: The narrowest any column but a key one becomes.
MIN_FOLD = 3


def _plain(cell: object) -> str:
    if isinstance(cell, Text):
        return cell.plain
    if isinstance(cell, str):
        return Text.from_markup(cell).plain
    return str(cell)


def _natural(column: Column) -> tuple[int, int]:
    """``(widest cell, longest word)`` of ``column``, its header included."""
    texts = [_plain(column.header), *(_plain(c) for c in column.cells)]
    widest = max((cell_len(line) for t in texts for line in t.splitlines() or [""]), default=1)
    word = max((cell_len(w) for t in texts for w in t.split()), default=1)
    return max(widest, 1), max(word, 1)


def plan_widths(
    natural: Sequence[int], words: Sequence[int], kinds: Sequence[str], room: int
) -> list[int]:
    """Widths (content only) of columns whose content is ``natural`` wide (its longest word
    ``words``), within ``room``. ``kinds``: ``"key"`` (never narrowed), ``"give_way:N"`` (N:
    the order it gives way in) or ``"wrap"``."""
    widths = list(natural)
    excess = sum(widths) - room
    give_way = sorted(
        (k for k, kind in enumerate(kinds) if kind != "key" and kind != "wrap"),
        key=kinds.__getitem__,
    )
    wrap = [k for k, kind in enumerate(kinds) if kind == "wrap"]
    for k in give_way:  # cut the free text first, in the order given
        cut = max(0, min(excess, widths[k] - MIN_GIVE_WAY))
        widths[k] -= cut
        excess -= cut
    # Then wrap the other columns at spaces (widest first), then cut the free text further,
    # and only then break the other columns within words.
    excess = _narrow(widths, wrap, words, excess)
    excess = _narrow(widths, give_way, [MIN_FOLD] * len(kinds), excess)
    excess = _narrow(widths, wrap, [MIN_FOLD] * len(kinds), excess)
    # Then the other columns down to one character if that lets the keys stay on one line;
    # else the keys themselves break across lines (print_table folds them), whole.
    others = [*wrap, *give_way]
    if excess <= sum(widths[k] - 1 for k in others):
        _narrow(widths, others, [1] * len(kinds), excess)
        return widths
    keys = [k for k, kind in enumerate(kinds) if kind == "key"]
    _narrow(widths, keys, [MIN_FOLD] * len(kinds), excess)
    return widths


def _narrow(widths: list[int], columns: Sequence[int], floor: Sequence[int], excess: int) -> int:
    while excess > 0:
        shrinkable = [k for k in columns if widths[k] > floor[k]]
        if not shrinkable:
            break
        widest = max(shrinkable, key=widths.__getitem__)
        widths[widest] -= 1
        excess -= 1
    return excess


def print_table(
    console: Console, table: Table, keys: Sequence[str], give_way: Sequence[str] = ()
) -> None:
    """Print ``table`` (rows added) within ``console.width``; see the module docstring."""
    kinds = []
    for column in table.columns:
        header = _plain(column.header)
        if header in keys:
            kinds.append("key")
        elif header in give_way:
            kinds.append(f"give_way:{list(give_way).index(header):03d}")
        else:
            kinds.append("wrap")
    measured = [_natural(column) for column in table.columns]
    if sum(m[0] for m in measured) > _room(table, console.width):
        # Too wide as drawn: frame it lighter first (no edges, one space between columns).
        table.box, table.show_edge = box.SIMPLE_HEAD, False
        table.pad_edge, table.collapse_padding = False, True
    room = _room(table, console.width)
    widths = plan_widths([m[0] for m in measured], [m[1] for m in measured], kinds, room)
    for column, width, kind in zip(table.columns, widths, kinds, strict=True):
        column.width = width
        if kind == "key":
            column.no_wrap = width >= _natural(column)[0]
            column.overflow = "fold"
        elif kind.startswith("give_way"):
            column.no_wrap = True
            column.overflow = "ellipsis"
        else:
            column.overflow = "fold"
    console.print(table)


def _room(table: Table, width: int) -> int:
    """What is left of ``width`` for the cells of ``table``, once its borders and padding are
    drawn."""
    padding = sum(table._get_padding_width(i) for i in range(len(table.columns)))
    return width - table._extra_width - padding
