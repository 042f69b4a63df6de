"""Typed errors of the arbiter, mapped to HTTP by their base class.

* ``InsufficientMemory`` (409, from ``vramancer.errors``): ``requested_bytes``,
  ``available_bytes`` (free now in the binding scope), ``reclaimable_bytes`` (what preempting
  every strictly lower priority would add), ``external_bytes`` (used outside VRAMancer, never
  granted), ``device``.
* ``InsufficientQuality`` (409): the memory fits but not at the asked ``min_quality``.
* ``Preempted`` (409): the allocation was taken by a higher-priority request.
* ``ArbiterTimeout`` (504): ``acquire`` waited ``timeout_s`` and memory did not free up.
* ``ShuttingDown`` (503, from ``vramancer.errors``): the arbiter is stopping; no new
  allocations.
"""

from __future__ import annotations

from vramancer import errors
from vramancer.arbiter.policy import NoRoom, QualityTooLow
from vramancer.errors import InsufficientMemory, ShuttingDown
from vramancer.units import format_size

__all__ = [
    "ArbiterTimeout",
    "InsufficientMemory",
    "InsufficientQuality",
    "Preempted",
    "ShuttingDown",
    "denial",
]


class InsufficientQuality(errors.Conflict):
    """``details``: ``minimum_quality`` asked, ``available_quality`` the best reachable."""

    code = "insufficient_quality"


class Preempted(errors.Conflict):
    """``details``: ``allocation_id``, ``by`` (the preempting allocation), ``priority``."""

    code = "preempted"


class ArbiterTimeout(errors.OperationTimeout):
    """``details``: ``timeout_s``, ``requested_bytes``, ``available_bytes``."""

    code = "arbiter_timeout"


def denial(plan: NoRoom | QualityTooLow) -> InsufficientMemory | InsufficientQuality:
    """The error of a plan that does not grant: what was asked, what is available, where."""
    if isinstance(plan, NoRoom):
        where = f"on {plan.device}" if plan.device else "in the arbiter's budget"
        outside = (
            f"{format_size(plan.external_bytes)} used outside VRAMancer, "
            if plan.external_bytes
            else ""
        )
        return InsufficientMemory(
            f"not enough VRAM: requested {format_size(plan.requested_bytes)}, "
            f"{format_size(plan.available_bytes)} available {where} "
            f"(budget {format_size(plan.budget_bytes)}, {outside}"
            f"{format_size(plan.reclaimable_bytes)} held by lower priorities)",
            requested_bytes=plan.requested_bytes,
            available_bytes=plan.available_bytes,
            reclaimable_bytes=plan.reclaimable_bytes,
            budget_bytes=plan.budget_bytes,
            external_bytes=plan.external_bytes,
            device=plan.device,
        )
    return InsufficientQuality(
        f"cannot reach quality {plan.minimum_quality:g}: at most "
        f"{plan.available_quality:g} under the current memory pressure",
        minimum_quality=plan.minimum_quality,
        available_quality=plan.available_quality,
        device=plan.device,
    )
