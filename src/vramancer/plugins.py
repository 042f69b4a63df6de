"""Objects named in the configuration by a dotted path, ``package.module:attr``: the extension
points (placement strategy, hotness model, compression manager, runtime estimator).

One loader for every section, so each extension point behaves the same: the object named is
used as it is, except that a class is instantiated without arguments and a plain function
(without the protocol's method) is called without arguments to make it. An object without the
method its protocol documents is refused at start-up, with a message naming the setting.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from vramancer.errors import InvalidInput

#: ``package.module:attr`` (the attribute may be dotted: ``module:Class.factory``).
DOTTED_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
_DOTTED_PATH_RE = re.compile(DOTTED_PATH)


def load_object(path: str, *, method: str, key: str) -> Any:
    """The object ``path`` names, made as the module docstring says; ``InvalidInput`` naming
    the setting ``key`` (``memory.placement_strategy``) when it cannot be loaded or lacks
    ``method``."""
    field = key.rpartition(".")[2]
    if not _DOTTED_PATH_RE.fullmatch(path):
        raise InvalidInput(f"{key} must read package.module:attr (got {path!r})", field=field)
    module_name, _, attr = path.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise InvalidInput(f"{key}: cannot load {path!r} ({exc})", field=field) from exc
    if isinstance(found, type) or (callable(found) and not hasattr(found, method)):
        found = found()
    if not callable(getattr(found, method, None)):
        raise InvalidInput(f"{key}: {path!r} has no {method}() method", field=field)
    return found
