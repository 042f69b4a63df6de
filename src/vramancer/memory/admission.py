"""Admission into an eviction index's main region: the W-TinyLFU-style duel.

A block enters a tier in a small recency *window* (``DEFAULT_WINDOW_FRACTION`` of the tier's
bytes, LRU order). When it leaves the window it takes a place among main's incumbents only if
its *history* (its hits before the latest, which the window has already rewarded) beats main's
coldest block by ``DUEL_MARGIN_LOG2``; otherwise it goes below every block and is the next
victim. W-TinyLFU's duel, with an exact per-block history instead of a sketch (the store keeps
every block's metadata anyway): loops and scans do not wash the tier out. How much of the latest
hit the duel discounts follows the learned ranking (``ranking.py``): all of it when the ranking
leans to frequency, none when it leans to recency (LRU).
"""

from __future__ import annotations

import math

#: Share of a tier's bytes given to the recency window (W-TinyLFU's 1 %).
DEFAULT_WINDOW_FRACTION = 0.01
#: A block leaving the window must beat main's coldest by this much (log2 of value) to take a
#: place among the incumbents; otherwise it is the next victim.
DUEL_MARGIN_LOG2 = 0.1
#: The window's duel discounts a block's latest hit fully at or above this ``x`` (the ranking's
#: log2 decay factor, ``ranking.py``), not at all at or below the other (see ``discount``).
DISCOUNT_FULL_AT = -1.0
DISCOUNT_NONE_AT = -4.0


def discount(x: float) -> float:
    """Share of its latest hit a block leaving the window is *not* credited with.

    1 in the frequency regime (``x`` ≥ ``DISCOUNT_FULL_AT``: only its history counts, the
    W-TinyLFU duel that keeps loops and scans out), 0 in the recency regime (``x`` ≤
    ``DISCOUNT_NONE_AT``: the latest hit counts fully, as in LRU), linear in between.
    """
    span = DISCOUNT_FULL_AT - DISCOUNT_NONE_AT
    return min(1.0, max(0.0, (x - DISCOUNT_NONE_AT) / span))


def admitted_key(key: float, coldest_key: float) -> float:
    """The heap key a block leaving the window enters main with, given main's coldest key.

    Its own ``key`` when it beats the coldest by ``DUEL_MARGIN_LOG2``; otherwise it lost the
    duel and goes below every block, newest loser first (W-TinyLFU evicts the rejected
    candidate; equals never displace incumbents).
    """
    if key <= coldest_key + DUEL_MARGIN_LOG2:
        return math.nextafter(min(key, coldest_key), -math.inf)
    return key
