"""What a model manager did during ``optimize_resources``, as data.

The resources orchestrator counts unloads and decides whether anything was optimised from
``kind``; the sentence is only for people (``actions_taken``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ModelActionKind(StrEnum):
    """The outcome of one optimisation step on one model."""

    #: The model was unloaded (idle, or least recently used under pressure).
    UNLOADED = "unloaded"
    #: The model was reloaded as its configured smaller variant.
    SWITCHED = "switched"
    #: The step was tried and failed; the model is as it was.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ModelAction:
    """One optimisation step: which model, what happened, and a sentence saying so."""

    kind: ModelActionKind
    model: str
    message: str

    def __str__(self) -> str:
        return self.message
