"""Adaptive ranking: how fast the eviction ranking forgets, learned from ghost hits (ARC-style).

The eviction index ranks by hit counts decayed with its own half-life ``half_life × 2^x``
(LRFU's knob: small ``x`` ranks by recency, large ``x`` by frequency). :class:`AdaptiveRanking`
moves ``x`` like ARC's ``p``: the ids of evicted blocks are remembered (seen-once and seen-more
lists, as many ids as blocks in the index); a seen-once ghost coming back asks for more recency
(an LRU would have kept it), a seen-more one for more frequency. As in ARC, where only a block
that was hit while cached can come back from the frequency side, a block evicted after losing the
admission duel with a small count (``GHOST_REJECTED_ONCE_HITS``) counts as seen once: it never
had a place among the frequent blocks. It holds no blocks: the index tells it evictions,
rejections and re-entries, and rebuilds its heap when the decay it should rank with changes.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from vramancer.memory.admission import discount
from vramancer.memory.records import BlockMeta

#: The eviction ranking decays counts with ``half_life × 2^x``; ghost hits move ``x`` within
#: these bounds (small x: the ranking tends to LRU; large x: to LFU). The wide range keeps the
#: policy right whatever the request rate is against the configured half-life.
RECENCY_LOG2_MIN = -10.0
RECENCY_LOG2_MAX = 6.0
#: Ghosts: a block evicted with a count under this is "seen once" (no earlier hit left with a
#: weight over 1/16); ghost lists hold at most max(blocks in the index, GHOST_MIN_BLOCKS) ids
#: each, and never more than GHOST_MAX.
GHOST_MORE_HITS = 1.0625
GHOST_MIN_BLOCKS = 64
GHOST_MAX = 65536
#: A block evicted after losing the admission duel, not hit since, with a count under this,
#: is a seen-once ghost whatever its count (ARC's B1: it was never among the frequent blocks).
#: Without it, a new working set's blocks, rejected again and again against an old set's
#: counts, come back as seen-more ghosts and vote for the very frequency that keeps them out.
GHOST_REJECTED_ONCE_HITS = 2.5
#: ARC's step factor (the other ghost list's length over this one's) is capped at this: when one
#: list is nearly empty, its few ghosts no longer outweigh the other list's many.
GHOST_RATIO_MAX = 16.0
#: Above ``GHOST_GAIN_FROM``, a ghost hit's step (ARC's) is multiplied by up to
#: ``1 + GHOST_RECENCY_GAIN`` (linearly from that weight to 1): near the recency end (a working
#: set that moved) the ranking moves fast both ways, so it goes back towards frequency soon after
#: the new set is in; at or below it the step is ARC's, so a stable popularity (weight near 0)
#: is not pulled off by stray hits, and the weight does not overshoot into the frequency end.
GHOST_RECENCY_GAIN = 24.0
GHOST_GAIN_FROM = 0.4
#: The ranking starts at ``x = log2(DEFAULT_RECENCY_FACTOR)`` (weight 7/16), a little on the
#: recency side of the hotness half-life.
DEFAULT_RECENCY_FACTOR = 0.5
#: The ranking is rebuilt when the learned ``x`` has moved by this much.
RERANK_STEP = 0.5


class AdaptiveRanking:
    """The learned ranking decay of one eviction index.

    ``x`` (log2 of the ranking half-life in units of the hotness half-life), ``inv_recency``
    (1 / that half-life, what the index's heap keys are computed with), ``discount`` (the
    admission duel's share of the latest hit, ``admission.discount(x)``) and
    ``recency_weight`` (ARC's ``p / c`` in [0, 1]: 0 ranks by frequency, 1 by recency).
    """

    __slots__ = (
        "_ghost_more",
        "_ghost_once",
        "_rejected",
        "discount",
        "half_life_s",
        "inv_recency",
        "recency_weight",
        "x",
    )

    def __init__(self, half_life_s: float, recency_factor: float = DEFAULT_RECENCY_FACTOR) -> None:
        self.half_life_s = half_life_s
        x = min(RECENCY_LOG2_MAX, max(RECENCY_LOG2_MIN, math.log2(recency_factor)))
        #: Recency weight in [0, 1] (ARC's p / c): 0 ranks by frequency, 1 by recency.
        self.recency_weight = (RECENCY_LOG2_MAX - x) / (RECENCY_LOG2_MAX - RECENCY_LOG2_MIN)
        self.x = x
        self.inv_recency = 1.0 / (half_life_s * math.pow(2.0, x))
        self.discount = discount(x)
        #: Ghosts of evicted blocks (ids only), seen-once and seen-more-often, oldest first.
        self._ghost_once: OrderedDict[str, None] = OrderedDict()
        self._ghost_more: OrderedDict[str, None] = OrderedDict()
        #: Ids of blocks in the index that lost the admission duel, not hit since, whose count
        #: alone would make them seen-more ghosts (see ``GHOST_REJECTED_ONCE_HITS``).
        self._rejected: set[str] = set()

    def ghost_hit(self, block_id: str, blocks: int) -> float | None:
        """A block comes back into an index of ``blocks`` blocks; returns the new
        ``inv_recency`` when the index must re-rank (rebuild its heap), else None.

        ARC's rule: a returning seen-once block says "more recency", a returning
        seen-more-often one says "more frequency"; each moves the recency weight by
        ``max(1, |other ghosts| / |its ghosts|) / blocks``, the factor capped at
        ``GHOST_RATIO_MAX``. The ranking follows once ``x`` has
        moved by ``RERANK_STEP``. Near the recency end the step is larger
        (``GHOST_RECENCY_GAIN``): the 2^x range is wide and a shifted working set drives the
        weight to 1, from where ARC's step takes hundreds of ghost hits to come back.
        """
        once, more = self._ghost_once, self._ghost_more
        scale = 1.0 / max(blocks, GHOST_MIN_BLOCKS)
        if block_id in once:
            step = min(GHOST_RATIO_MAX, max(1.0, len(more) / len(once))) * scale
            del once[block_id]
        elif block_id in more:
            step = -min(GHOST_RATIO_MAX, max(1.0, len(once) / len(more))) * scale
            del more[block_id]
        else:
            return None
        lean = (self.recency_weight - GHOST_GAIN_FROM) / (1.0 - GHOST_GAIN_FROM)
        if lean > 0.0:
            step *= 1.0 + GHOST_RECENCY_GAIN * lean
        weight = min(1.0, max(0.0, self.recency_weight + step))
        self.recency_weight = weight
        x = RECENCY_LOG2_MAX - weight * (RECENCY_LOG2_MAX - RECENCY_LOG2_MIN)
        if abs(x - self.x) >= RERANK_STEP or (x != self.x and weight in (0.0, 1.0)):
            self.x = x
            self.discount = discount(x)
            self.inv_recency = 1.0 / (self.half_life_s * math.pow(2.0, x))
            return self.inv_recency
        return None

    def rejected(self, block: BlockMeta) -> None:
        """``block`` lost the admission duel: if it is evicted before a hit, it is seen once."""
        if GHOST_MORE_HITS <= block.hits < GHOST_REJECTED_ONCE_HITS:
            self._rejected.add(block.id)

    def forget_rejection(self, block_id: str) -> None:
        """The block was hit in the index, or left it without an eviction."""
        self._rejected.discard(block_id)

    def remember_eviction(self, block: BlockMeta, blocks: int) -> None:
        """``block`` was evicted from an index of ``blocks`` blocks: remember its ghost."""
        rejected = block.id in self._rejected
        if rejected:
            self._rejected.discard(block.id)
        once = rejected or block.hits < GHOST_MORE_HITS
        ghosts = self._ghost_once if once else self._ghost_more
        ghosts[block.id] = None
        limit = max(blocks, GHOST_MIN_BLOCKS)
        limit = min(limit, GHOST_MAX)
        while len(ghosts) > limit:
            ghosts.popitem(last=False)
