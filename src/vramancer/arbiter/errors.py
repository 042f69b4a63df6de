"""Typed errors of the arbiter, mapped to HTTP by their base class.

* ``InsufficientMemory`` (409, from ``vramancer.errors``): ``requested_bytes``,
  ``available_bytes`` (free now in the binding scope), ``reclaimable_bytes`` (what preempting
  every strictly lower priority would add), ``device``.
* ``InsufficientQuality`` (409): the memory fits but not at the asked ``min_quality``.
* ``Preempted`` (409): the allocation was taken by a higher-priority request.
* ``ArbiterTimeout`` (504): ``acquire`` waited ``timeout_s`` and memory did not free up.
* ``ShuttingDown`` (503, from ``vramancer.errors``): the arbiter is stopping; no new
  allocations.
"""

from __future__ import annotations

from vramancer import errors
from vramancer.errors import InsufficientMemory, ShuttingDown

__all__ = [
    "ArbiterTimeout",
    "InsufficientMemory",
    "InsufficientQuality",
    "Preempted",
    "ShuttingDown",
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
