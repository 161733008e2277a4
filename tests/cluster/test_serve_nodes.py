"""`ringpipe serve --nodes N` as a user runs it: a head and N worker nodes on 127.0.0.1, each replica's
stages on different worker nodes, Ctrl-C stops every process it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import free_port
from tests.reference import hf_greedy, wait_for

pytestmark = pytest.mark.slow


def test_serve_with_worker_nodes(make_checkpoint, tmp_path):
    checkpoint = make_checkpoint("llama", tokenizer=True, vocab=512, layers=4, hidden=64)
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 — read back below
    server = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(checkpoint), "--nodes", "2",
         "--replicas", "1", "--stages", "2", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    started: list[int] = []
    try:
        def serving() -> bool:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            return "ringpipe serving" in (tmp_path / "serve.log").read_text()

        wait_for(serving, 240, "ringpipe serve --nodes 2 to be ready")
        started = [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        raylets = [p for p in psutil.Process(server.pid).children(recursive=True) if "raylet" in p.name()]
        assert len(raylets) == 3, [p.name() for p in raylets]  # the head and 2 worker nodes
        # nothing it started listens beyond loopback: Ray, Serve's proxy and replicas, the stages' stores
        listening = {(proc.name(), c.laddr.ip, c.laddr.port) for proc in map(psutil.Process, [server.pid, *started])
                     for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for _, ip, _ in listening), sorted(listening)

        target = f"127.0.0.1:{port}"
        cli = [sys.executable, "-m", "cluster.cli"]
        status = json.loads(subprocess.run([*cli, "status", "--target", target, "--json"], capture_output=True,
                                           text=True, env=env, check=True).stdout)
        (replica,) = status["replicas"]
        assert len({s["node_id"] for s in replica["stages"]}) == 2  # SPREAD: one stage per worker node
        out = subprocess.run([*cli, "generate", "--prompt-ids", "5,17,99,3", "--max-new-tokens", "6", "--json",
                              "--target", target], capture_output=True, text=True, env=env, check=True)
        assert json.loads(out.stdout.splitlines()[-1])["token_ids"] == hf_greedy(checkpoint, (5, 17, 99, 3), 6)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in started):
        time.sleep(0.2)
    left = [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after Ctrl-C: {left}"
