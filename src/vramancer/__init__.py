"""VRAMancer: decides which models, jobs and data blocks live in which memory, and when.

The public entry points are :class:`Runtime` (the composition root, VRAMancer inside your
program), :class:`Settings`, and :class:`Client` (a running daemon over HTTP). They are imported
lazily so that ``import vramancer`` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vramancer._version import __version__

if TYPE_CHECKING:
    from vramancer.client import Client
    from vramancer.config import Settings
    from vramancer.runtime import Runtime

__all__ = ["Client", "Runtime", "Settings", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Runtime":
        from vramancer.runtime import Runtime

        return Runtime
    if name == "Client":
        from vramancer.client import Client

        return Client
    if name == "Settings":
        from vramancer.config import Settings

        return Settings
    raise AttributeError(name)
