"""`ringpipe serve` as a user starts it, from a benchmark: a subprocess with its own local Ray cluster.

`served(config)` writes the YAML, starts `ringpipe serve --config` in a process group of its own,
waits for its "serving" line and yields the gRPC target; on the way out it sends Ctrl-C (the
command stops everything it started) and, if that does not end it, kills the group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(config: dict, ready_timeout_s: float = 300.0) -> Iterator[tuple[str, subprocess.Popen]]:
    config = {**config, "server": {"coordinators": 1, "metrics_port": 0, **config.get("server", {}), "port": free_port()}}
    with tempfile.TemporaryDirectory(prefix="ringpipe-bench-serve-") as tmp:
        path = Path(tmp) / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        log = open(Path(tmp) / "serve.log", "w+")  # noqa: SIM115 — read back on failure
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "--config", str(path)], cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + ready_timeout_s
            while "ringpipe serving" not in Path(log.name).read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ringpipe serve did not come up:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(0.5)
            yield f"127.0.0.1:{config['server']['port']}", proc
        finally:
            stop(proc)
            log.close()


def stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything of its group still there
    proc.wait()


def ray_processes() -> dict[str, psutil.Process]:
    """The service's processes by role, as Ray names them in their command lines."""
    roles = {"stage": "ray::StageActor", "coordinator": "Coordinator", "proxy": "ray::ProxyActor"}
    found: dict[str, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        for role, mark in roles.items():
            if mark in line and role not in found:
                found[role] = p
    return found


class CpuMeter:
    """Cores each of `procs` used from construction to `cores()`."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs = procs
        self._start = time.perf_counter(), {k: self._cpu(p) for k, p in procs.items()}

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    def cores(self) -> dict[str, float]:
        wall, before = self._start
        dt = time.perf_counter() - wall
        return {k: (self._cpu(p) - before[k]) / dt for k, p in self.procs.items()}
