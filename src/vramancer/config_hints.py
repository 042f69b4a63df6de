"""Where a configuration problem was written, and what a misspelt key may have meant.

The settings are a tree of pydantic models (sections, nested sections, tables of them). These
helpers walk that tree by key so that a misspelt key, at any depth, in the TOML file or in a
``VRM_*`` variable, gets the closest real key (``did you mean server.port?``), and so that a
problem is named as the user wrote it: the variable's name, or the key's spelling in the file.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

#: A table whose keys are free (``[memory.tiers]``, ``[profiles]``): any key, this value type.
_ANY_KEY = "*"


def _unwrap(annotation: Any) -> Any:
    """The model, table or list inside ``Annotated[...]`` / ``X | None``; else as is."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        nested = [m for m in members if _children(m) is not None]
        return nested[0] if nested else annotation
    return annotation


def _children(annotation: Any) -> dict[str, Any] | None:
    """The keys under ``annotation`` and their types (``{"*": T}`` for a free table or a list);
    None for a value (nothing below it is checked here)."""
    annotation = _unwrap(annotation)
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return {name: field.annotation for name, field in annotation.model_fields.items()}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (dict, Mapping) and len(args) == 2:
        return {_ANY_KEY: args[1]}
    if origin in (list, tuple, Sequence) and args:
        return {_ANY_KEY: args[0]}
    return None


def misspelt(root: type[BaseModel], path: Sequence[str | int]) -> tuple[int, list[str]] | None:
    """The index in ``path`` of the first key that names nothing (keys compared without case)
    and the keys that were possible there; None when every key is known (or below a value)."""
    annotation: Any = root
    for i, part in enumerate(path):
        children = _children(annotation)
        if children is None:
            return None
        if _ANY_KEY in children:
            annotation = children[_ANY_KEY]
            continue
        found = next((k for k in children if k.lower() == str(part).lower()), None)
        if found is None:
            return i, sorted(children)
        annotation = children[found]
    return None


def closest(path: Sequence[str | int], index: int, choices: Sequence[str]) -> list[str] | None:
    """``path`` with its key at ``index`` replaced by the closest of ``choices``, or None."""
    match = difflib.get_close_matches(str(path[index]).lower(), list(choices), n=1, cutoff=0.6)
    if not match:
        return None
    return [*map(str, path[:index]), match[0], *map(str, path[index + 1 :])]


def env_problem(root: type[BaseModel], name: str) -> str | None:
    """Why the ``VRM_*`` variable ``name`` names no setting (with the closest one that does),
    or None when it names one."""
    parts = name.upper().removeprefix("VRM_").split("__")
    found = misspelt(root, [p.lower() for p in parts])
    if found is None:
        return None
    index, choices = found
    fixed = closest([p.lower() for p in parts], index, choices)
    where = "a setting" if index == 0 else f"a key of VRM_{'__'.join(parts[:index])}"
    hint = f"; did you mean VRM_{'__'.join(fixed).upper()}?" if fixed else ""
    return f"{name}: unknown setting ({parts[index]} is not {where}){hint}"


def spelt_as_defined(root: type[BaseModel], path: Sequence[str | int]) -> list[str]:
    """``path`` with each key as the settings define it (``Server.Port`` -> ``server.port``)."""
    annotation: Any = root
    spelt = []
    for part in path:
        children = _children(annotation) or {}
        if _ANY_KEY in children:
            annotation, found = children[_ANY_KEY], str(part)
        else:
            found = next((k for k in children if k.lower() == str(part).lower()), str(part))
            annotation = children.get(found)
        spelt.append(found)
    return spelt


def key_hint(root: type[BaseModel], loc: Sequence[str | int]) -> str:
    """``; did you mean a.b?`` for an unknown key at ``loc``, or an empty string. A key that
    differs only in case (``[Server]``) is unknown too: the file's keys are exact."""
    found = misspelt(root, loc)
    if found is None:
        spelt = spelt_as_defined(root, loc)
        return f"; did you mean {'.'.join(spelt)}?" if spelt != list(map(str, loc)) else ""
    fixed = closest(loc, *found)
    return f"; did you mean {'.'.join(fixed)}?" if fixed else ""


def as_written(data: Mapping[str, Any], loc: Sequence[str | int]) -> list[str] | None:
    """``loc`` spelt as in ``data`` (the TOML file's tables; keys compared without case), or
    None when the file does not hold it."""
    written: list[str] = []
    node: Any = data
    for part in loc:
        if isinstance(node, Mapping):
            key = next((k for k in node if str(k).lower() == str(part).lower()), None)
            if key is None:
                return None
            written.append(str(key))
            node = node[key]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            written.append(str(part))
            node = node[part]
        else:
            return None
    return written


def env_var(environ: Mapping[str, str], loc: Sequence[str | int]) -> str | None:
    """The ``VRM_*`` variable that set ``loc`` as written, with where in its JSON value when it
    set a table or list above it (``VRM_MODELS (at 0.name)``), or None."""
    for n in range(len(loc), 0, -1):
        wanted = "VRM_" + "__".join(str(p) for p in loc[:n]).upper()
        name = next((name for name in environ if name.upper() == wanted), None)
        if name is not None:
            rest = ".".join(str(p) for p in loc[n:])
            return f"{name} (at {rest})" if rest else name
    return None
