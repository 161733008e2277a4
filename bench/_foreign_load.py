"""How much CPU the rest of the machine used while we timed something.

Every timed run in the benchmark carries this figure: on a shared machine it says whether a
comparison means anything.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil


class ForeignLoad:
    """Cores the rest of the machine kept busy since construction: /proc/stat busy time minus our tree's.

    On a 2-core box one busy neighbour makes a 2-thread torch team wait for its second core at
    every op, so every timed run carries this figure.
    """

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._start = (time.perf_counter(), self._busy_s(), self._ours_s())

    @staticmethod
    def _busy_s() -> float:
        user, nice, system, _, _, irq, softirq = (
            int(x) for x in Path("/proc/stat").read_text().split()[1:8]
        )
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")

    def _ours_s(self) -> float:
        total = 0.0
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                t = proc.cpu_times()  # children_*: our descendants that have exited
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:  # ended meanwhile
                continue
        return total

    def cores(self) -> float:
        wall, busy, ours = self._start
        return max(0.0, (self._busy_s() - busy) - (self._ours_s() - ours)) / (
            time.perf_counter() - wall
        )
