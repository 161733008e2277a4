"""Node CPU from real processes: a spinning tree is seen, a spinner outside it is not.

The wall clock of `NodeCpu` is faked (one second between samples), so a
sample × cores is the CPU seconds it counted; what it should have counted is
read independently from /proc/PID/stat. Tests wait for a spinner to burn CPU
(a condition polled with a deadline), never for a fixed time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil
import pytest

from shards.load import NodeCpu

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")

SPIN = "while True: pass"
SLEEP = "import time; time.sleep(60)"
# a parent that starts one child running `code`, prints its pid, waits for it, then idles
PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]])\n"
    "print(child.pid, flush=True)\n"
    "child.wait()\n"
    "time.sleep(60)\n"
)
AS_RAYLET = "import ctypes, time; ctypes.CDLL(None).prctl(15, b'raylet', 0, 0, 0); time.sleep(60)"  # PR_SET_NAME


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cpu_s(pid: int) -> float:
    """utime + stime of one process, from /proc/PID/stat (fields 14 and 15, after the parenthesised name)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(condition: Callable[[], bool], what: str, deadline_s: float = 8.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def burned(pid: int, seconds: float) -> float:
    """Wait until `pid` has used `seconds` more CPU; returns how much it used meanwhile."""
    start = cpu_s(pid)
    wait_until(lambda: cpu_s(pid) - start >= seconds, f"process {pid} used {seconds}s of CPU")
    return cpu_s(pid) - start


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def started(*commands: list[str]) -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    children: list[int] = []
    try:
        for cmd in commands:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        yield procs
    finally:
        for proc in procs:  # their children first, so none is left behind re-parented
            children += [c.pid for c in _children(proc.pid)]
        for pid in children:
            _kill(pid)
        for proc in procs:
            _kill(proc.pid)
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree(child_code: str) -> list[str]:
    return [sys.executable, "-c", PARENT, child_code]


def child_pid(parent: subprocess.Popen) -> int:
    assert parent.stdout is not None
    return int(parent.stdout.readline())


def test_tree_mode_counts_a_spinning_descendant_of_the_root():
    with started(tree(SPIN)) as (parent,):
        spinner = child_pid(parent)
        clock = Clock()
        real_start = time.monotonic()
        cpu = NodeCpu(parent.pid, clock, mode="tree")
        used = burned(spinner, 0.4)
        clock.now += 1.0
        seen = cpu.sample() * cpu.cores  # CPU seconds the tree used between the two samples
        real_s = time.monotonic() - real_start
        assert seen >= 0.3
        assert seen >= used - 0.02  # the spinner's CPU (by /proc) fell between the samples
        assert seen <= real_s * cpu.cores + 0.02  # no more than the machine could have given


def test_tree_mode_ignores_a_spinner_outside_the_tree_that_system_mode_sees():
    with started(tree(SLEEP), [sys.executable, "-c", SPIN]) as (idle_parent, outsider):
        child_pid(idle_parent)  # the tree is up: an idle parent and its sleeping child
        clock = Clock()
        real_start = time.monotonic()
        node, machine = NodeCpu(idle_parent.pid, clock, mode="tree"), NodeCpu(None)
        assert machine.mode == "system"
        used = burned(outsider.pid, 0.4)
        clock.now += 1.0
        assert node.sample() * node.cores < 0.1
        busy = machine.sample() * machine.cores * (time.monotonic() - real_start)
        assert busy >= 0.5 * used  # the whole machine includes the outsider


def test_a_process_that_ends_between_samples_never_makes_the_sample_negative():
    short = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\n"
    with started(tree(short)) as (parent,):
        worker = child_pid(parent)
        clock = Clock()
        cpu = NodeCpu(parent.pid, clock, mode="tree")
        burned(worker, 0.2)
        clock.now += 1.0
        assert cpu.sample() * cpu.cores >= 0.2 - 0.02
        wait_until(lambda: not psutil.pid_exists(worker), "the short child has exited")
        clock.now += 1.0
        assert 0.0 <= cpu.sample() * cpu.cores <= 1.0  # at most what it had left, never below 0
        clock.now += 1.0
        assert cpu.sample() * cpu.cores < 0.1  # the idle parent alone


def test_mode_is_tree_only_for_a_raylet_among_several():
    assert NodeCpu(None).mode == "system"
    assert NodeCpu(os.getpid()).mode == "system"  # pytest is no raylet: system-wide
    with started([sys.executable, "-c", SLEEP]) as (gone,):
        pass
    assert NodeCpu(gone.pid).mode == "system"  # no such process
    raylet = [sys.executable, "-c", AS_RAYLET]
    with started(raylet, raylet) as (a, b):
        for p in (a, b):
            wait_until(lambda p=p: psutil.Process(p.pid).name() == "raylet", "the fake raylet renamed itself")
        assert NodeCpu(a.pid).mode == "tree"  # two raylets on one machine: a local multi-node cluster
    with pytest.raises(ValueError):
        NodeCpu(None, mode="tree")
