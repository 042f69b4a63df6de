"""VRAMancer: decides which models, jobs and data blocks live in which memory, and when.

The public entry points are :class:`Runtime` (the composition root) and :class:`Settings`.
They are imported lazily so that ``import vramancer`` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vramancer._version import __version__

if TYPE_CHECKING:
    from vramancer.config import Settings
    from vramancer.runtime import Runtime

__all__ = ["Runtime", "Settings", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Runtime":
        from vramancer.runtime import Runtime

        return Runtime
    if name == "Settings":
        from vramancer.config import Settings

        return Settings
    raise AttributeError(name)
