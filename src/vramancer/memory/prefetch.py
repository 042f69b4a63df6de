"""Prefetch: predicting the next blocks a reader will ask for, so the store promotes them ahead.

:class:`SequentialPrefetcher` recognises ``…/7`` then ``…/8`` (streams) and learned successor
pairs, and keeps quiet when its predictions do not come true; :class:`NoPrefetch` is the
baseline.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

#: Prefetcher: most streams and successor pairs remembered, most ids predicted per access.
PREFETCH_MAX_STREAMS = 4096
PREFETCH_MAX_SUCCESSORS = 65536
DEFAULT_PREFETCH_DEPTH = 4
#: Prefetcher: a stream must advance by +1 this many times before it is trusted.
PREFETCH_MIN_RUN = 2
#: Prefetcher: a learned successor must be seen this many times before it is predicted.
PREFETCH_MIN_SUCCESSOR_COUNT = 2
#: Prefetcher: predictions still open (waiting to be confirmed) are forgotten beyond this many.
PREFETCH_MAX_OUTSTANDING = 4096
#: Prefetcher: a prediction not read within this many accesses counts as wrong.
PREFETCH_HORIZON = 64
#: Prefetcher: a kind of prediction whose accuracy (EWMA) is under this stays silent, except
#: one access in ``PREFETCH_RETRY_EVERY`` (to notice a pattern coming back).
PREFETCH_MIN_ACCURACY = 0.25
PREFETCH_ACCURACY_ALPHA = 0.05
PREFETCH_RETRY_EVERY = 64

_DIGITS = "0123456789"
_STREAM = 0
_SUCCESSOR = 1


def split_sequence_id(block_id: str) -> tuple[str, int, int] | None:
    """``"conv42/page/7"`` → ``("conv42/page/", 7, 0)``; ``"shard-00003"`` → (…, 3, 5).

    The third item is the zero-padded width (0 when the number is not padded). ``None`` when the
    id does not end with ASCII digits. (``str.rstrip``, not a regular expression: this runs on
    every read.)
    """
    prefix = block_id.rstrip(_DIGITS)
    cut = len(prefix)
    if cut == len(block_id):
        return None
    digits = block_id[cut:]
    width = len(digits) if len(digits) > 1 and digits[0] == "0" else 0
    return prefix, int(digits), width


def format_sequence_id(prefix: str, number: int, width: int) -> str:
    return f"{prefix}{number:0{width}d}" if width else f"{prefix}{number}"


class SequentialPrefetcher:
    """Predicts the next blocks of sequential streams and of learned successor pairs.

    * Streams: ids ending with an integer share a prefix (``conv42/page/``, ``model-x/shard-``).
      When a prefix's number advances by exactly one ``PREFETCH_MIN_RUN`` times in a row, the
      next ``min(depth, run)`` ids are predicted (ramping up like a kernel read-ahead). Any
      other step resets that stream, so random ids never trigger it.
    * Successors: for any id, the id read right after it is remembered with a confidence count
      (a one-slot Misra–Gries counter); once seen ``PREFETCH_MIN_SUCCESSOR_COUNT`` times it is
      predicted. This catches repeated non-numeric orders (layer names of one model).
    * Accuracy feedback: a prediction not read within ``PREFETCH_HORIZON`` accesses counts as
      wrong; each kind (stream, successor) keeps an EWMA of its accuracy and stays silent while
      it is under ``PREFETCH_MIN_ACCURACY`` (it keeps learning, and is retried now and then).

    Returned ids may not exist; the store ignores those it does not hold, and promotes the
    others ahead of the reader (as blocks never read, they are the first to leave again).
    """

    def __init__(self, depth: int = DEFAULT_PREFETCH_DEPTH) -> None:
        self.depth = depth
        #: prefix -> [last number, run length, trusted (a past run reached the minimum)]
        self._streams: OrderedDict[str, list[int]] = OrderedDict()
        #: id -> [successor id, confidence]
        self._successors: OrderedDict[str, list[Any]] = OrderedDict()
        self._previous: str | None = None
        #: predicted id -> (access number when predicted, kind) — oldest first
        self._outstanding: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._accesses = 0
        #: EWMA accuracy per kind (0: stream, 1: successor)
        self.accuracy = [1.0, 1.0]
        self.issued = 0
        self.useful = 0

    def observe(self, block_id: str, now: float) -> Sequence[str]:
        if self.depth <= 0:  # predicting nothing: nothing worth learning either
            return ()
        self._accesses += 1
        if self._outstanding:
            self._score(block_id)
        stream = self._stream(block_id)
        guess = self._successor(block_id)
        self._previous = block_id
        if not stream and guess is None:
            return ()
        predicted: list[str] = []
        if stream and self._trusted(_STREAM):
            predicted.extend(stream)
            for pid in stream:
                self._remember(pid, _STREAM)
        if guess is not None and guess not in predicted and self._trusted(_SUCCESSOR):
            predicted.append(guess)
            self._remember(guess, _SUCCESSOR)
        return predicted

    def _trusted(self, kind: int) -> bool:
        if self.accuracy[kind] >= PREFETCH_MIN_ACCURACY:
            return True
        # Silent, but retried now and then so that a pattern that comes back is picked up again.
        return self._accesses % PREFETCH_RETRY_EVERY == 0

    def _update(self, kind: int, good: bool) -> None:
        target = 1.0 if good else 0.0
        self.accuracy[kind] += PREFETCH_ACCURACY_ALPHA * (target - self.accuracy[kind])

    def _score(self, block_id: str) -> None:
        outstanding = self._outstanding
        hit = outstanding.pop(block_id, None)
        if hit is not None:
            self.useful += 1
            self._update(hit[1], True)
        horizon = self._accesses - PREFETCH_HORIZON
        while outstanding:
            pid, (issued_at, kind) = next(iter(outstanding.items()))
            if issued_at >= horizon and len(outstanding) <= PREFETCH_MAX_OUTSTANDING:
                break
            del outstanding[pid]
            self._update(kind, False)

    def _remember(self, pid: str, kind: int) -> None:
        if pid in self._outstanding:
            return
        self.issued += 1
        self._outstanding[pid] = (self._accesses, kind)

    def _stream(self, block_id: str) -> list[str]:
        # split_sequence_id inlined (this runs on every read); the width only when predicting
        prefix = block_id.rstrip(_DIGITS)
        if len(prefix) == len(block_id):
            return []
        number = int(block_id[len(prefix) :])
        streams = self._streams
        state = streams.get(prefix)
        if state is None:
            streams[prefix] = [number, 0, 0]
            if len(streams) > PREFETCH_MAX_STREAMS:
                streams.popitem(last=False)
            return []
        streams.move_to_end(prefix)
        if number == state[0] + 1:
            state[1] += 1
            if state[1] >= PREFETCH_MIN_RUN:
                state[2] = 1  # this prefix is read sequentially: trust its next restart
        elif number != state[0]:
            if state[1] < PREFETCH_MIN_RUN:
                state[2] = 0
            state[1] = 0
        state[0] = number
        run = state[1]
        if run >= PREFETCH_MIN_RUN:
            ahead = min(self.depth, run)
        elif state[2]:
            ahead = 1
        else:
            return []
        digits = block_id[len(prefix) :]
        width = len(digits) if len(digits) > 1 and digits[0] == "0" else 0
        return [format_sequence_id(prefix, number + k, width) for k in range(1, ahead + 1)]

    def _successor(self, block_id: str) -> str | None:
        """Learn ``previous → block_id`` (a one-slot Misra–Gries counter per id), then return
        the confident successor of ``block_id``, if any."""
        successors = self._successors
        previous = self._previous
        if previous is not None and previous != block_id:
            slot = successors.get(previous)
            if slot is None:
                successors[previous] = [block_id, 1]
                if len(successors) > PREFETCH_MAX_SUCCESSORS:
                    successors.popitem(last=False)
            else:
                successors.move_to_end(previous)
                if slot[0] == block_id:
                    slot[1] += 1
                elif slot[1] > 1:
                    slot[1] -= 1
                else:
                    slot[0], slot[1] = block_id, 1
        mine = successors.get(block_id)
        if mine is None or mine[1] < PREFETCH_MIN_SUCCESSOR_COUNT:
            return None
        return str(mine[0])


class NoPrefetch:
    """Prefetcher that never predicts (baseline)."""

    def observe(self, block_id: str, now: float) -> Sequence[str]:
        return ()
