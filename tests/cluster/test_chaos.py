"""`ringpipe chaos` as an operator runs it, against `ringpipe serve --nodes 4` (a head and 4 worker
nodes, real raylets on 127.0.0.1): every fault kind under load, nodes restarted, the report checked
against what it claims; and a run whose requests cannot succeed exits 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from tests.conftest import free_port
from tests.reference import hf_greedy, ringpipe_serve, wait_for

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "cluster.cli"]
KINDS = ("kill-node", "kill-actor", "kill-coordinator", "pause-node", "slow-node")
MAX_NEW = 16


@pytest.fixture(scope="module")
def served(make_checkpoint, tmp_path_factory):
    """(gRPC target, Ray address, checkpoint, env) of `ringpipe serve --nodes 4`; stopped with Ctrl-C after."""
    checkpoint = make_checkpoint("llama", vocab=512, layers=4, hidden=64)
    config = {
        "model": {"path": str(checkpoint)},
        "pipeline": {"stages": 2, "max_batch": 4, "max_seq_len": 128, "cpus_per_stage": 0.5},
        "replicas": {"count": 2, "standby": 1},
        "server": {"port": free_port(), "http_port": free_port(), "coordinators": 2},
    }
    with ringpipe_serve(config, tmp_path_factory.mktemp("chaos"), nodes=4, timeout_s=240) as serving:
        yield serving.target, serving.address, checkpoint, serving.env


def chaos(served, report, *args: str, timeout: float = 400) -> tuple[subprocess.CompletedProcess, dict]:
    target, address, _, env = served
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
    _, _, checkpoint, _ = served
    report = tmp_path / "report"
    done, record = chaos(served, report, *(f"--fault={k}" for k in KINDS), "--every", "9s", "--duration", "40s",
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
