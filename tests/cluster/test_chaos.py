"""`ringpipe serve --nodes 4` (a head and 4 worker nodes, real raylets on 127.0.0.1) as a user runs it,
and `ringpipe chaos` as an operator runs it against that.

First what serve started: each replica's stages on nodes of their own, nothing listening beyond
loopback, gRPC and the OpenAI API answering, the Prometheus endpoints it printed showing ringpipe's
metrics moving with the requests sent. Then chaos: every fault kind under load, nodes restarted, the
report checked against what it claims; and a run whose requests cannot succeed exits 1. Last, Ctrl-C
stops every process serve started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections import defaultdict
from types import SimpleNamespace

import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.reference import hf_greedy, ringpipe_serve, starting_nodes, wait_for

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "cluster.cli"]
KINDS = ("kill-node", "kill-actor", "kill-coordinator", "pause-node", "slow-node")
MAX_NEW = 16
NODES, MAX_BATCH = 4, 4


@pytest.fixture(scope="module")
def served(make_checkpoint, tmp_path_factory):
    """`ringpipe serve --nodes 4`: its gRPC target, Ray address, env, pid and output, the checkpoint and
    the metrics port; stopped with Ctrl-C after, which must leave nothing of what it started running."""
    checkpoint = make_checkpoint("llama", tokenizer=True, vocab=512, layers=4, hidden=64)
    metrics_port = free_port(NODES + 1)
    config = {
        "model": {"path": str(checkpoint)},
        "pipeline": {"stages": 2, "max_batch": MAX_BATCH, "max_seq_len": 128, "cpus_per_stage": 0.5},
        "replicas": {"count": 2, "standby": 1},
        "server": {"port": free_port(), "http_port": free_port(), "coordinators": 2, "metrics_port": metrics_port},
    }
    # Ray's processes report their metrics to their node's agent every second (10 by default): the
    # scrapes see the requests sooner
    with ringpipe_serve(config, tmp_path_factory.mktemp("chaos"), NODES, 240,
                        env={"RAY_metrics_report_interval_ms": "1000"}) as serving:
        yield SimpleNamespace(target=serving.target, address=serving.address, env=serving.env, pid=serving.pid,
                              log=serving.log, checkpoint=checkpoint, metrics_port=metrics_port)
    assert serving.stopped["code"] == 0, serving.log.read_text()[-3000:]
    assert not serving.stopped["left"], f"processes left running 30 s after Ctrl-C: {serving.stopped['left']}"


def test_serve_with_worker_nodes(served):
    checkpoint, env, target = served.checkpoint, served.env, served.target
    wait_for(lambda: "Prometheus metrics: " in served.log.read_text(), 30, "serve to print its metrics URLs")
    log = served.log.read_text()
    started = psutil.Process(served.pid).children(recursive=True)
    raylets = [p for p in started if "raylet" in p.name()]
    assert len(raylets) == NODES + 1, [p.name() for p in raylets]  # the head and each worker node
    # nothing it started listens beyond loopback: Ray, Serve's proxy and replicas, the stages' stores
    listening = {(proc.name(), c.laddr.ip, c.laddr.port) for proc in [psutil.Process(served.pid), *started]
                 for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for _, ip, _ in listening), sorted(listening)

    # the head's metrics on the pinned port, each worker node's on the next ones up
    urls = re.findall(r"http://\S+/metrics", re.search(r"Prometheus metrics: .*", log)[0])
    assert urls == [f"http://127.0.0.1:{served.metrics_port + i}/metrics" for i in range(NODES + 1)]
    before = scrape(urls)

    status = json.loads(subprocess.run([*CLI, "status", "--target", target, "--json"], capture_output=True,
                                       text=True, env=env, check=True).stdout)
    nodes = [{s["node_id"] for s in r["stages"]} for r in status["replicas"]]
    assert [len(n) for n in nodes] == [2, 2]  # SPREAD: each stage on a node of its own
    assert not nodes[0] & nodes[1]  # and the replicas on disjoint nodes: one node lost takes one replica
    out = subprocess.run([*CLI, "generate", "--prompt-ids", "5,17,99,3", "--max-new-tokens", "6", "--json",
                          "--target", target], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.splitlines()[-1])["token_ids"] == hf_greedy(checkpoint, (5, 17, 99, 3), 6)
    subprocess.run([*CLI, "generate", "--prompt-ids", "7,8", "--max-new-tokens", "4", "--stream",
                    "--target", target], capture_output=True, env=env, check=True)
    bad = subprocess.run([*CLI, "generate", "--prompt-ids", "7,9999", "--target", target], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr, bad.stderr
    # the OpenAI API at the URL it printed, with the official client
    base_url = re.search(r"OpenAI API: (\S+) \(model \"([^\"]+)\"\)", log)
    assert base_url[2] == checkpoint.name
    api = openai.OpenAI(base_url=base_url[1], api_key="unused", max_retries=0, timeout=60)
    answer = api.completions.create(model=base_url[2], prompt=[5, 17, 99, 3], max_tokens=6, temperature=0)
    assert answer.usage.completion_tokens == len(json.loads(out.stdout.splitlines()[-1])["token_ids"])
    assert_metrics_moved(urls, before, max_batch=MAX_BATCH, answered=3, replicas=2, standbys=1)


def chaos(served, report, *args: str, timeout: float = 400) -> tuple[subprocess.CompletedProcess, dict]:
    target, address, env = served.target, served.address, served.env
    done = subprocess.run([*CLI, "chaos", "--address", address, "--target", target, "--report", str(report),
                           "--max-new-tokens", str(MAX_NEW), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    record = json.loads((report / "report.json").read_text()) if (report / "report.json").exists() else {}
    for pid in record.get("restarted_nodes", []):  # the nodes chaos started outlive it: stop them with the test
        served_pids.append(pid)
    return done, record


served_pids: list[int] = []


@pytest.fixture(scope="module", autouse=True)
def stop_restarted_nodes():
    yield
    for pid in served_pids:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGTERM)  # cluster.local_node stops its node's processes on SIGTERM
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                             for p in served_pids), 60, "restarted nodes to stop")


def test_every_fault_under_load_loses_nothing(served, tmp_path):
    checkpoint = served.checkpoint
    report = tmp_path / "report"
    with starting_nodes():  # --restart-nodes: it starts the nodes it killed again
        done, record = chaos(served, report, *(f"--fault={k}" for k in KINDS), "--every", "8s", "--duration", "33s",
                             "--warmup", "3s", "--cooldown", "5s", "--pause", "4s", "--slow", "4s",
                             "--restart-nodes", "--concurrency", "3", "--seed", "7")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {p.name for p in report.iterdir()} >= {"report.json", "summary.md", "timeline.png"}
    assert (report / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "All invariants held" in done.stdout

    # the references are right: greedy ones equal transformers' continuation
    greedy = [e for e in record["pool"] if not e["sampling"]]
    assert greedy
    for entry in greedy[:4]:
        assert entry["expected"] == hf_greedy(checkpoint, tuple(entry["prompt"]), MAX_NEW)

    # what the report claims, recounted from its records
    requests = record["requests"]
    assert len(requests) > 30
    assert all(r["ok"] and not r["mismatch"] and r["repeated"] == 0 and r["lost"] == 0 for r in requests)
    assert {r["mode"] for r in requests} == {"unary", "stream"}
    first_round = [f["kind"] for f in record["faults"][: len(KINDS)]]
    faults = {f["kind"]: f for f in record["faults"]}
    # each kind once per round (seed 7 draws kill-node and kill-actor among the first four)
    assert len(first_round) >= 4 and len(set(first_round)) == len(first_round) and set(faults) <= set(KINDS)
    assert {"kill-node", "kill-actor"} <= set(faults) and all(f["error"] is None for f in record["faults"])
    assert all(f["recovered_s"] is not None for f in record["faults"]), [
        (f["kind"], f["t"], f["detected_s"], f.get("restarted")) for f in record["faults"] if f["recovered_s"] is None]
    for kind in ("kill-actor", "kill-node"):  # each broke a pipeline, seen by the controller, then made whole
        assert faults[kind]["touched"] or kind == "kill-node"
        if faults[kind]["touched"]:
            assert faults[kind]["detected_s"] is not None, faults[kind]
        assert faults[kind]["recovered_s"] is not None, faults[kind]
    assert faults["kill-node"].get("restarted") and record["restarted_nodes"]
    # resumed streams: some request saw a fault and still matched its reference
    during = [r for r in requests if any(f["t"] <= r["t_end"] and r["t_start"] <= f["t"] + 1 for f in record["faults"])]
    assert during


def test_broken_invariants_fail_the_run(served, tmp_path):
    """Requests with a deadline they cannot meet fail: the report lists them and the exit status is 1."""
    report = tmp_path / "report"
    done, record = chaos(served, report, "--fault", "slow-node", "--every", "2s", "--duration", "2s",
                         "--warmup", "1s", "--cooldown", "1s", "--slow", "1s", "--request-timeout", "0.01s",
                         "--rate", "8")  # the open-loop load: Poisson arrivals
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert record["settings"]["load"]["rate"] == 8
    failed = [r for r in record["requests"] if not r["ok"]]
    assert failed and all(r["error"].startswith("DEADLINE_EXCEEDED") for r in failed)
    assert "INVARIANT BROKEN" in done.stderr and "DEADLINE_EXCEEDED" in (report / "summary.md").read_text()


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


def assert_metrics_moved(urls: list[str], before: dict, max_batch: int, answered: int, replicas: int,
                         standbys: int) -> None:
    """After `answered` answered requests (gRPC and HTTP, one streamed) and one refused one: the latency
    histograms, the requests by status and the controller's gauges, as exported (Ray's agents export
    every few seconds: polled)."""
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
    assert value(seen, "ring_size") == value(seen, "members") == replicas and value(seen, "standbys") == standbys
    assert {s: value(seen, "replica_state", **replica, state=s) for s in ("serving", "paused", "rebuilding")} == {
        "serving": 1, "paused": 0, "rebuilding": 0}
    assert value(seen, "kv_slots", **replica) == max_batch
    assert 0 <= value(seen, "kv_slots_used", **replica) <= max_batch
    assert value(seen, "time_to_first_token_seconds_bucket", le="+Inf") == value(
        seen, "time_to_first_token_seconds_count")
