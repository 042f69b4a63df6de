"""What the resources orchestrator needs from a model manager, as a Protocol.

``optimize_resources`` asks the model manager to free what it can; the runtime passes its
``ModelManager`` (which satisfies this structurally), the CLI's local reading passes none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from vramancer.resources.actions import ModelAction


class ModelsOptimizer(Protocol):
    """The model manager's side of ``optimize_resources``."""

    async def optimize(self) -> Sequence[ModelAction]:
        """Unload idle models, switch to smaller variants under pressure; one record a step."""
        ...
