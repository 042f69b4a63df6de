"""One way to write a size and a priority on every command line.

* A size is what ``--vram`` takes: bytes, or a number and a unit (``512MiB``, ``4GiB``,
  ``1.5GB``; ``vramancer.units.parse_size``).
* A priority is a word (``background``, ``normal``, ``high``, ``user_facing``: the task and
  allocation priorities) or a number from 0 to 1000 (the scale of data blocks, higher stays up).
  Each word stands for a number (``PRIORITY_NUMBERS``) and each number for the highest word at
  or below it, so both forms work wherever a priority is taken.

A bad value exits with code 2 and a message that names the option.
"""

from __future__ import annotations

from vramancer.arbiter.types import Priority
from vramancer.cli.common import fail
from vramancer.memory.checks import MAX_PRIORITY
from vramancer.units import parse_size

#: The number each priority word stands for, on the 0..1000 scale of data blocks.
PRIORITY_NUMBERS = {
    Priority.BACKGROUND: 0,
    Priority.NORMAL: 250,
    Priority.HIGH: 500,
    Priority.USER_FACING: MAX_PRIORITY,
}
PRIORITY_FORM = f"a number from 0 to {MAX_PRIORITY} or one of " + ", ".join(PRIORITY_NUMBERS)


def size(value: str, option: str) -> int:
    """``value`` in bytes; a bad one fails naming ``option``."""
    try:
        return parse_size(value)
    except ValueError as exc:
        fail(f"{option}: {exc}", code=2)


def priority_number(value: str, option: str = "--priority") -> int:
    """``value`` (a word or a number) on the 0..1000 scale."""
    text = value.strip().lower()
    for word, number in PRIORITY_NUMBERS.items():
        if text == word.value:
            return number
    if text.isascii() and text.isdigit() and len(text) <= 4 and int(text) <= MAX_PRIORITY:
        return int(text)
    shown = repr(value) if len(value) <= 40 else repr(value[:37]) + "..."
    fail(f"{option}: expected {PRIORITY_FORM} (got {shown})", code=2)


def priority_word(value: str, option: str = "--priority") -> Priority:
    """``value`` (a word or a number) as a word: a number means the highest word at or below
    it (0-249 background, 250-499 normal, 500-999 high, 1000 user_facing)."""
    number = priority_number(value, option)
    return max(
        (word for word, at in PRIORITY_NUMBERS.items() if at <= number),
        key=PRIORITY_NUMBERS.__getitem__,
    )
