"""A real network partition, as a user makes one: `ringpipe serve --nodes 4 --netns` (each worker node in
a network namespace of its own, joined to a bridge by a veth pair) and `ringpipe chaos --fault
partition-node`, which cuts one node's links for 20 s under load while its stages run on, cut off.

Streams on plain gRPC stubs run back to back all along. Every one completes with exactly
transformers' greedy tokens; no piece from the cut-off replica (its ring position at its old epoch)
reaches a client after the controller's verdict on it; chaos's own load loses nothing; and once the
links are back, a replica serves from the partitioned node again. Needs root (namespaces, links):
skipped elsewhere, with the reason.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from cluster import netns
from protos.ringpipe.v1 import inference_pb2 as pb
from protos.ringpipe.v1 import inference_pb2_grpc
from tests.conftest import free_port
from tests.reference import hf_greedy, ringpipe_serve, starting_nodes, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))]

PROMPTS = [(5, 17, 99, 3), (8, 8, 1, 40, 41), (300, 12), (77, 78, 79, 80)]
NEW_TOKENS = 120
PARTITION_S = 20
FENCE_SLACK_S = 2.0  # the verdict reaches the coordinators' routers within this (a membership push)
CLI = [sys.executable, "-m", "cluster.cli"]


class BackToBack:
    """`threads` plain-stub clients, each streaming one prompt after another until `stop()`; every
    message is kept with the wall time it arrived."""

    def __init__(self, target: str, threads: int = 4) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.streams: list[tuple[tuple[int, ...], list[tuple[float, pb.GenerateStreamResponse]]]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            req = pb.GenerateRequest(max_new_tokens=NEW_TOKENS, ignore_eos=True)
            req.token_ids.ids.extend(prompt)
            got: list[tuple[float, pb.GenerateStreamResponse]] = []
            self.streams.append((prompt, got))
            try:
                for msg in self.stub.GenerateStream(req, timeout=240):
                    got.append((time.time(), msg))
            except grpc.RpcError as exc:
                self.errors.append(f"{prompt}: {exc.code().name} {exc.details()}")

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(300)
        self.channel.close()
        assert not any(t.is_alive() for t in self.threads), "a stream did not finish"


def status(target: str, env: dict) -> dict:
    out = subprocess.run([*CLI, "status", "--target", target, "--json"], capture_output=True, text=True, env=env,
                         check=True, timeout=60)
    return json.loads(out.stdout.splitlines()[-1])


def remove_leftovers(cluster: int) -> None:
    """What a crashed run of `serve --netns` may have left: its namespaces (and all in them), its bridge."""
    for name in netns.namespaces():
        if name.startswith(f"{netns.NAMESPACE_PREFIX}{cluster}-"):
            netns.NodeNet(cluster, int(name.rsplit("-", 1)[1])).delete()
    try:
        netns.ip("link", "delete", f"rp{cluster}-br")
    except netns.NetnsError:
        pass


def test_partitioned_node_is_fenced_and_rejoins(make_checkpoint, tmp_path: Path):
    checkpoint = make_checkpoint("llama", tokenizer=True, vocab=512, layers=4, hidden=64)
    expected = {p: hf_greedy(checkpoint, p, NEW_TOKENS) for p in PROMPTS}
    config = {
        "model": {"path": str(checkpoint)},
        "pipeline": {"stages": 2, "max_batch": 4, "max_seq_len": 256},
        "replicas": {"count": 2, "standby": 0},
        "server": {"port": free_port(), "http_port": free_port(), "coordinators": 1},
    }
    cluster, left = None, []
    try:
        with ringpipe_serve(config, tmp_path, 4, 300.0, "--netns") as served:
            target, address, env = served.target, served.address, served.env
            assert netns.is_netns_address(target) and netns.is_netns_address(address), (target, address)
            cluster = int(address.split(".")[2])
            check_partition(target, address, env, expected, tmp_path)
    finally:
        if cluster is not None:  # Ctrl-C removed the namespaces and the bridge; if not, say so and do it
            left = [n for n in netns.namespaces() if n.startswith(f"{netns.NAMESPACE_PREFIX}{cluster}-")]
            remove_leftovers(cluster)
    assert not left, f"namespaces left after Ctrl-C: {left}"


def check_partition(target: str, address: str, env: dict, expected: dict, tmp_path: Path) -> None:
    before = status(target, env)
    nodes = {s["address"] for r in before["replicas"] for s in r["stages"]}
    assert len(nodes) == 4 and all(netns.namespace_of(a) for a in nodes), nodes  # disjoint, each in its own
    epochs = {r["replica_id"]: r["epoch"] for r in before["replicas"]}

    load = BackToBack(target)
    wait_for(lambda: sum(len(got) > 5 for _, got in load.streams) >= 4, 120, "streams under way")
    with starting_nodes():  # --restart-nodes: a node Ray found dead meanwhile is started again
        chaos = subprocess.run(
            [*CLI, "chaos", "--target", target, "--address", address, "--fault", "partition-node",
             "--partition", f"{PARTITION_S}s", "--duration", "1s", "--warmup", "1s", "--cooldown", "1s",
             "--pool", "4", "--concurrency", "2", "--max-new-tokens", "24", "--restart-nodes",
             "--report", str(tmp_path / "chaos")],
            capture_output=True, text=True, env=env, timeout=600,
        )
    load.stop()
    assert chaos.returncode == 0, chaos.stdout[-3000:] + chaos.stderr[-3000:]  # chaos's own load: nothing lost
    record = json.loads((tmp_path / "chaos" / "report.json").read_text())
    (fault,) = record["faults"]
    assert fault["error"] is None and fault["detected_s"] is not None and fault["recovered_s"] is not None, fault
    cut_ip = re.search(r"\((\S+)\)", fault["target"])[1]
    cut_at = record["started_at"] + fault["t"]

    after = status(target, env)
    verdicts = [f for f in after["failovers"] if f["at_unix_s"] >= cut_at]
    assert verdicts, after["failovers"]
    fenced = {(f["replica_id"], epochs[f["replica_id"]]): f["at_unix_s"] for f in verdicts}
    # every stream exact, and none got a piece from a fenced member after its verdict
    assert not load.errors, load.errors
    moved = 0
    for prompt, got in load.streams:
        tokens = [t for _, m in got for t in m.token_ids]
        assert tokens == expected[prompt], f"a stream of {prompt} differs from transformers' greedy tokens"
        members = [(m.served_by.replica_id, m.served_by.epoch) for _, m in got if m.served_by.replica_id]
        for arrived, m in got:
            verdict_at = fenced.get((m.served_by.replica_id, m.served_by.epoch))
            assert verdict_at is None or arrived <= verdict_at + FENCE_SLACK_S, (
                f"a piece from fenced {m.served_by.replica_id}@{m.served_by.epoch} arrived {arrived - verdict_at:.1f}s after the verdict")
        moved += any(k in fenced for k in members) and members[-1] not in fenced
    assert moved, "no stream was on the partitioned replica when its link was cut"
    # the links back: the partitioned node serves a ring member again
    serving = [r for r in after["replicas"] if r["state"] == "serving"]
    assert len(serving) == 2, after["replicas"]
    assert cut_ip in {s["address"] for r in serving for s in r["stages"]}, (cut_ip, serving)
