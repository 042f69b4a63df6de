"""CPU seconds used by a set of processes and their descendants between two readings.

``ProcessCpu([pid, ...])`` reads, at creation, the CPU time (user + system, with the time of
children they already waited for) of this process, the given processes and every descendant of
them; ``used_s()`` reads it again and returns the difference. A process that started and ended
in between is counted through its parent's ``children_*`` times; one that was alive at the first
reading and ended before the second is counted in full (a slight over-count, the same for every
system measured).
"""

from __future__ import annotations

import contextlib
import os

import psutil


def _tree_cpu_s(pids: list[int]) -> float:
    seen: set[int] = set()
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


class ProcessCpu:
    """CPU used since creation by this process, ``pids`` and all their descendants."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = [os.getpid(), *pids]
        self._start = _tree_cpu_s(self._pids)

    def used_s(self) -> float:
        return max(0.0, _tree_cpu_s(self._pids) - self._start)
