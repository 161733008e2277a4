"""Node CPU as the node sees it: the fraction (0..1) of the machine's cores busy since the last sample.

Feeds the adaptive weights (`failover/adaptive.py`): a stage reports its node's
CPU and the controller lowers the weight of a replica on a hot node. Two modes,
chosen at construction from the raylet pid (a Ray worker's parent, `os.getppid()`):

- system: the machine's busy time over its total CPU time, as
  `psutil.cpu_percent(interval=None) / 100` reports it, but from this object's
  own previous sample (psutil's module-wide baseline would be shared by every
  caller in the process). On a real node, one raylet per machine, this is the
  node.
- tree: the CPU time of the raylet and all its descendants per wall second,
  over the machine's cores. Used when several raylets share the machine (a local
  multi-node cluster, as `ray.cluster_utils.Cluster` makes), so a CPU hog on one
  local node counts against that node only. Only processes still under the
  raylet count: one that was re-parented away (its parent exited) is not the
  node's any more.

CPU time is kept per process, keyed by (pid, start time) so a reused pid is a
new process. The tree is listed at every sample, so a process first seen now
started since the previous sample: all of its CPU time is new. One that ended
between samples drops out (its last part is lost, never subtracted), so a
sample is never negative.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Literal

import psutil

Mode = Literal["system", "tree"]


def raylets_on_this_machine() -> int:
    """How many Ray raylet processes run here (several: a local multi-node cluster)."""
    count = 0
    for proc in psutil.process_iter(["name"]):
        if "raylet" in (proc.info["name"] or ""):
            count += 1
    return count


class NodeCpu:
    def __init__(
        self,
        raylet_pid: int | None,
        clock: Callable[[], float] = time.monotonic,
        mode: Mode | None = None,
    ) -> None:
        """`mode` None chooses: tree when `raylet_pid` is a raylet and other raylets share the machine."""
        self.clock = clock
        self.cores = psutil.cpu_count() or os.cpu_count() or 1
        self.root = raylet_pid
        self.mode: Mode = mode or self._choose(raylet_pid)
        if self.mode == "tree" and raylet_pid is None:
            raise ValueError("tree mode needs the raylet's pid")
        self._busy_total = self._system_times()
        self._last_wall = clock()
        self._cpu_s = self._tree_times() if self.mode == "tree" else {}

    @staticmethod
    def _choose(raylet_pid: int | None) -> Mode:
        if raylet_pid is None:
            return "system"
        try:
            is_raylet = "raylet" in psutil.Process(raylet_pid).name()
        except psutil.Error:
            return "system"
        return "tree" if is_raylet and raylets_on_this_machine() > 1 else "system"

    def sample(self) -> float:
        """CPU utilisation of the node since the previous call (or construction), a fraction 0..1."""
        if self.mode == "system":
            busy_total = self._system_times()
            busy = busy_total[0] - self._busy_total[0]
            total = busy_total[1] - self._busy_total[1]
            self._busy_total = busy_total
            return _fraction(busy / total) if total > 0 else 0.0
        wall, cpu_s = self.clock(), self._tree_times()
        used = sum(max(0.0, seconds - self._cpu_s.get(key, 0.0)) for key, seconds in cpu_s.items())
        elapsed = wall - self._last_wall
        self._cpu_s, self._last_wall = cpu_s, wall
        return _fraction(used / (elapsed * self.cores)) if elapsed > 0 else 0.0

    @staticmethod
    def _system_times() -> tuple[float, float]:
        """(busy, total) CPU seconds of the machine since boot, counted as psutil.cpu_percent does."""
        t = psutil.cpu_times()
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # guest is inside user
        idle = t.idle + getattr(t, "iowait", 0.0)
        return total - idle, total

    def _tree_times(self) -> dict[tuple[int, float], float]:
        """CPU seconds (user + system) of the raylet and every descendant, by (pid, start time)."""
        assert self.root is not None
        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {}  # the raylet is gone: its node is going down, nothing runs there
        out = {}
        for proc in procs:
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    out[(proc.pid, proc.create_time())] = t.user + t.system
            except psutil.Error:  # ended while we looked
                continue
        return out


def _fraction(x: float) -> float:
    return min(1.0, max(0.0, x))
