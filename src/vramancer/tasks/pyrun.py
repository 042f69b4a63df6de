"""Runs one ``python`` task in its own process: ``python -m vramancer.tasks.pyrun MOD:FUNC JSON``.

``JSON`` is the task's payload: ``{"args": [...], "kwargs": {...}}``. The function is imported
and called (awaited when it returns a coroutine); its return value, when not None, is printed
as one JSON line on stdout. An exception prints its traceback on stderr and exits with 1; a bad
target or payload exits with 2.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import sys
import traceback
from typing import Any

USAGE_EXIT = 2


def _resolve(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m vramancer.tasks.pyrun MODULE:FUNCTION JSON", file=sys.stderr)
        return USAGE_EXIT
    target, raw = argv
    try:
        payload = json.loads(raw)
        args = payload.get("args", [])
        kwargs = payload.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise TypeError("payload.args must be a list and payload.kwargs an object")
        func = _resolve(target)
    except Exception as exc:
        print(f"cannot run {target}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return USAGE_EXIT
    try:
        result = func(*args, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
    except Exception:
        traceback.print_exc()
        return 1
    if result is not None:
        print(json.dumps(result, default=str))
    return 0


async def _await(awaitable: Any) -> Any:
    return await awaitable


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
