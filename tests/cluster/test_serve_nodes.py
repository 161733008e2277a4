"""`ringpipe serve --nodes N` as a user runs it: a head and N worker nodes on 127.0.0.1, each replica's
stages on different worker nodes, the Prometheus endpoints it prints show ringpipe's metrics moving
with the requests sent, Ctrl-C stops every process it started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict

import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.reference import hf_greedy, wait_for

pytestmark = pytest.mark.slow


def test_serve_with_worker_nodes(make_checkpoint, tmp_path):
    checkpoint = make_checkpoint("llama", tokenizer=True, vocab=512, layers=4, hidden=64)
    port, http_port, metrics_port = free_port(), free_port(), free_port(3)
    # Ray's processes report their metrics to their node's agent every second (10 by default): the
    # scrapes below see the requests sooner
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_metrics_report_interval_ms": "1000"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 — read back below
    server = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(checkpoint), "--nodes", "2",
         "--replicas", "1", "--stages", "2", "--port", str(port), "--http-port", str(http_port), "--metrics-port", str(metrics_port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    started: list[int] = []
    try:
        def serving() -> bool:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            return "Prometheus metrics: " in (tmp_path / "serve.log").read_text()

        wait_for(serving, 240, "ringpipe serve --nodes 2 to be ready")
        started = [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        raylets = [p for p in psutil.Process(server.pid).children(recursive=True) if "raylet" in p.name()]
        assert len(raylets) == 3, [p.name() for p in raylets]  # the head and 2 worker nodes
        # nothing it started listens beyond loopback: Ray, Serve's proxy and replicas, the stages' stores
        listening = {(proc.name(), c.laddr.ip, c.laddr.port) for proc in map(psutil.Process, [server.pid, *started])
                     for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for _, ip, _ in listening), sorted(listening)

        # the head's metrics on the pinned port, each worker node's on the next ones up
        urls = re.findall(r"http://\S+/metrics", re.search(r"Prometheus metrics: .*", (tmp_path / "serve.log").read_text())[0])
        assert urls == [f"http://127.0.0.1:{metrics_port + i}/metrics" for i in range(3)]
        before = scrape(urls)

        target = f"127.0.0.1:{port}"
        cli = [sys.executable, "-m", "cluster.cli"]
        status = json.loads(subprocess.run([*cli, "status", "--target", target, "--json"], capture_output=True,
                                           text=True, env=env, check=True).stdout)
        (replica,) = status["replicas"]
        assert len({s["node_id"] for s in replica["stages"]}) == 2  # SPREAD: one stage per worker node
        out = subprocess.run([*cli, "generate", "--prompt-ids", "5,17,99,3", "--max-new-tokens", "6", "--json",
                              "--target", target], capture_output=True, text=True, env=env, check=True)
        assert json.loads(out.stdout.splitlines()[-1])["token_ids"] == hf_greedy(checkpoint, (5, 17, 99, 3), 6)
        subprocess.run([*cli, "generate", "--prompt-ids", "7,8", "--max-new-tokens", "4", "--stream",
                        "--target", target], capture_output=True, env=env, check=True)
        bad = subprocess.run([*cli, "generate", "--prompt-ids", "7,9999", "--target", target], capture_output=True,
                             text=True, env=env)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr, bad.stderr
        # the OpenAI API at the URL it printed, with the official client
        base_url = re.search(r"OpenAI API: (\S+) \(model \"([^\"]+)\"\)", (tmp_path / "serve.log").read_text())
        assert base_url[1] == f"http://127.0.0.1:{http_port}/v1" and base_url[2] == checkpoint.name
        api = openai.OpenAI(base_url=base_url[1], api_key="unused", max_retries=0, timeout=60)
        answer = api.completions.create(model=base_url[2], prompt=[5, 17, 99, 3], max_tokens=6, temperature=0)
        assert answer.usage.completion_tokens == len(json.loads(out.stdout.splitlines()[-1])["token_ids"])
        assert_metrics_moved(urls, before, max_batch=8, answered=3)
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


RINGPIPE_LABELS = {"replica", "kind", "action", "reason", "status", "state", "way", "le"}  # not Ray's own


def scrape(urls: list[str]) -> dict[tuple[str, frozenset], float]:
    """Every `ray_ringpipe_*` sample on every node, by name and ringpipe's labels (summed over Ray's:
    node, worker, session)."""
    samples: dict[tuple[str, frozenset], float] = defaultdict(float)
    for url in urls:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("ray_ringpipe_"):
                    labels = frozenset((k, v) for k, v in s.labels.items() if k in RINGPIPE_LABELS)
                    samples[(s.name, labels)] += s.value
    return samples


def assert_metrics_moved(urls: list[str], before: dict, max_batch: int, answered: int) -> None:
    """After `answered` answered requests (gRPC and HTTP, one streamed) and one refused one: the latency
    histograms, the requests by status and the controller's gauges, as exported (Ray's agents export every few seconds: polled)."""
    def value(seen: dict, name: str, **labels: str) -> float:
        return seen.get((f"ray_ringpipe_{name}", frozenset(labels.items())), 0.0)

    def moved(seen: dict, name: str, by: float, **labels: str) -> bool:
        return value(seen, name, **labels) >= value(before, name, **labels) + by

    replica = {"replica": "replica-0"}
    seen: dict = {}
    gauges = {"ray_ringpipe_time_to_first_token_seconds_bucket", "ray_ringpipe_time_per_output_token_seconds_bucket",
              "ray_ringpipe_in_flight", "ray_ringpipe_queue_depth", "ray_ringpipe_replica_weight",
              "ray_ringpipe_heartbeat_pings_total", "ray_ringpipe_kv_slots", "ray_ringpipe_replica_state"}

    def exported() -> bool:
        seen.clear()
        seen.update(scrape(urls))
        return (moved(seen, "time_to_first_token_seconds_count", answered)
                and moved(seen, "time_per_output_token_seconds_count", answered)
                and moved(seen, "requests_total", answered, status="OK")
                and moved(seen, "requests_total", 1, status="INVALID_ARGUMENT")
                and ("ray_ringpipe_kv_slots_used", frozenset(replica.items())) in seen
                and gauges <= {name for name, _ in seen})

    try:
        wait_for(exported, 90, "ringpipe's metrics to move after the requests")
    except AssertionError:
        moves = {k: v - before.get(k, 0.0) for k, v in seen.items() if v != before.get(k, 0.0) and "bucket" not in k[0]}
        missing = gauges - {name for name, _ in seen}
        raise AssertionError(f"ringpipe's metrics did not move as expected; what moved: {moves}; "
                             f"not exported: {sorted(missing)}") from None
    assert value(seen, "ring_size") == value(seen, "members") == 1 and value(seen, "standbys") == 0
    assert {s: value(seen, "replica_state", **replica, state=s) for s in ("serving", "paused", "rebuilding")} == {
        "serving": 1, "paused": 0, "rebuilding": 0}
    assert value(seen, "kv_slots", **replica) == max_batch
    assert 0 <= value(seen, "kv_slots_used", **replica) <= max_batch
    assert value(seen, "time_to_first_token_seconds_bucket", le="+Inf") == value(
        seen, "time_to_first_token_seconds_count")
