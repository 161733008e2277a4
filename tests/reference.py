"""Expected values from independent sources, shared by the test packages.

`hf_greedy` is transformers' forward pass in a plain greedy loop: the reference
every greedy output of ours is compared with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
import tempfile
import time
from pathlib import Path

import torch


@functools.cache
def hf_greedy(model_dir: Path, prompt: tuple[int, ...], n: int) -> list[int]:
    """Greedy tokens from transformers' full forward pass, one step at a time.

    (Not `generate(min_new_tokens=...)`: that masks EOS, which a plain greedy
    decoder — ours — may rightly pick.)
    """
    model = _hf_model(model_dir)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


@functools.cache
def _hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# `make test` runs two pytest-xdist workers (tests/conftest.py), and Ray gives a starting node's raylet
# 30 s to register with its GCS (ray/_private/node.py), which one node starting beside another
# cluster's start-up on 2 busy cores once missed. So a test starts Ray nodes holding this lock, one
# file for the whole run (xdist gives its workers the run's id), and the workers take turns.
NODES_LOCK = Path(tempfile.gettempdir()) / f"ringpipe-tests-{os.environ.get('PYTEST_XDIST_TESTRUNUID', 'serial')}.lock"


@contextlib.contextmanager
def starting_nodes():
    """Held while this test process starts Ray nodes (a cluster, a node, a command that starts one)."""
    with open(NODES_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def wait_for(condition, timeout_s: float = 60.0, what: str = "condition") -> None:
    """Polls `condition` until it holds: every 50 ms at first, backing off to every 0.5 s, and never
    more often than the condition itself takes (a status call, a scrape of every node's metrics): on
    2 cores the polling must not starve the system it waits for."""
    deadline = time.monotonic() + timeout_s
    interval = 0.05
    while True:
        began = time.monotonic()
        if condition():
            return
        spent = time.monotonic() - began
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(max(interval, spent))
        interval = min(0.5, interval * 1.5)


def stop_started(proc, started, sig: int, timeout_s: float = 120.0, linger_s: float = 30.0) -> dict:
    """Stop `proc` (started with `start_new_session=True`) with `sig`, its whole group if it does not
    exit within `timeout_s`; give what it started (`started`, pids) `linger_s` to go, then SIGKILL what
    is left. Returns {"code": its exit status, "left": the pids that had to be killed}."""
    import os
    import signal
    import subprocess

    import psutil

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    proc.send_signal(sig)
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    deadline = time.monotonic() + linger_s
    while (left := [p for p in started if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"code": code, "left": left}


@dataclasses.dataclass(frozen=True)
class Served:
    """A `ringpipe serve` started by a test: its gRPC target, its Ray address, the env it ran with, its
    output; once stopped, `stopped` says how (`stop_started`'s answer)."""

    target: str
    address: str
    env: dict
    pid: int
    log: Path
    stopped: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def ringpipe_serve(config: dict, directory: Path, nodes: int, timeout_s: float = 300.0, *flags: str,
                   env: dict | None = None):
    """`ringpipe serve --config … --nodes N [flags]` as an operator starts it (its own session, its
    output in `directory`/serve.log, `env` added to its environment), yielded as `Served` once it
    printed its Ray address; stopped with Ctrl-C after, and whatever it started killed if still there
    30 s later (`Served.stopped` says what was)."""
    import os
    import re
    import signal
    import subprocess
    import sys

    import psutil
    import yaml

    path = directory / "service.yaml"
    config = {**config, "server": {"metrics_port": 0, **config.get("server", {})}}  # not 8080: tests run side by side
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    log_path = directory / "serve.log"
    nodes_lock = contextlib.ExitStack()
    nodes_lock.enter_context(starting_nodes())  # until it is up
    try:
        with open(log_path, "w") as log:
            server = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--config", str(path),
                                       "--nodes", str(nodes), *flags],
                                      stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    except BaseException:
        nodes_lock.close()
        raise
    started: set[int] = set()
    served = None

    def descendants() -> set[int]:
        try:
            return {p.pid for p in psutil.Process(server.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    try:
        def ready() -> bool:
            assert server.poll() is None, log_path.read_text()[-3000:]
            return "Ray cluster: " in log_path.read_text()

        wait_for(ready, timeout_s, f"ringpipe serve --nodes {nodes}")
        nodes_lock.close()
        text = log_path.read_text()
        target, address = re.search(r" on (\S+) \(gRPC\)", text)[1], re.search(r"Ray cluster: (\S+)", text)[1]
        started = descendants()
        served = Served(target, address, env, server.pid, log_path)
        yield served
    finally:
        nodes_lock.close()
        stopped = stop_started(server, started | descendants(), signal.SIGINT)
        if served is not None:
            served.stopped.update(stopped)
