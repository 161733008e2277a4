"""The process that breaks a node from inside it: `python -m cluster.node_fault ACTION RAYLET_PID SECONDS`.

`cluster.chaos` starts it from a Ray task placed on the node, so it works on any
cluster, with no SSH: the task's worker is a child of the node's raylet, and
this process, started by that worker, outlives it. Actions:
  kill   SIGKILL the raylet, then every process under it (workers, agents): a node failure
  pause  SIGSTOP them all for SECONDS, then SIGCONT: a hang, or a partition that heals
  slow   one busy process per core for SECONDS: a CPU hog beside the node's work
  partition  the node's links down for SECONDS, then up: a real partition, its processes running on
         (a node in a network namespace of its own, `cluster/netns.py`; refused on the machine's own)
This process and its ancestors are never signalled.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

import psutil

GRACE_S = 0.3  # lets the task that started us return its answer first


def _victims(raylet_pid: int) -> list[psutil.Process]:
    raylet = psutil.Process(raylet_pid)
    spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    return [raylet, *(p for p in raylet.children(recursive=True) if p.pid not in spared)]


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _spin(until: float) -> None:
    while time.monotonic() < until:
        pass


def main(action: str, raylet_pid: int, seconds: float) -> None:
    time.sleep(GRACE_S)
    if action == "kill":
        _signal(_victims(raylet_pid), signal.SIGKILL)  # the raylet first: it must not restart its workers
    elif action == "pause":
        procs = _victims(raylet_pid)
        _signal(procs, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            _signal(procs, signal.SIGCONT)
    elif action == "slow":
        until = time.monotonic() + seconds
        hogs = [multiprocessing.Process(target=_spin, args=(until,)) for _ in range(os.cpu_count() or 1)]
        for hog in hogs:
            hog.start()
        for hog in hogs:
            hog.join()
    elif action == "partition":
        from cluster.netns import cut_own_links

        cut_own_links(seconds)
    else:
        raise SystemExit(f"unknown action {action!r}: kill, pause, slow or partition")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
