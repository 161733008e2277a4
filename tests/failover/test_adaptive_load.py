"""Adaptive weights end to end: a CPU hog on one node of a real multi-node local Ray cluster lowers
its replica's weight within 15 s, and with it the replica's share of new requests (by at least 30 %);
once the hog stops the weight goes back to 1.0 and the share comes back.

The service is its own `ringpipe serve --config … --nodes 3` (a head and 3 worker nodes, each a real
raylet on 127.0.0.1), not the session's `service`: a Ray cluster holds one ringpipe service (the
controller's actor name and the Serve app's name are fixed), and this one needs its own adaptive rule
(fast: hot for 2 s is a cut). So this process stays off Ray; everything goes through the real gRPC
proxy (requests, `ringpipe status`), and the hog is started by a Ray driver of that cluster in a
subprocess: Ray tasks pinned to the replica's node, busy loops, so they run under that node's raylet,
where the stages measure their node's CPU (`shards/load.py`, tree mode).

Shares are counted in requests, not seconds: clients in threads send one request after another, each
with a random session id (so a random owner on the ring), and a window is the next N requests started.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import psutil
import pytest

from coordinator.client import Client
from protos.ringpipe.v1 import admin_pb2
from shards.load import NodeCpu
from tests.conftest import VOCAB, free_port
from tests.reference import ringpipe_serve, wait_for

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "cluster.cli"]

# Node CPU on this 2-core machine (tree mode: a node's raylet and its descendants over the machine's
# cores), as observed: a replica's node under this load 0.15-0.37 (its stage alone; with the coordinator
# too, 0.5); the hogged one 0.5-0.9; the other one 0.03-0.2 while the hog takes the cores.
HOT_CPU = 0.42
# The hogs are Ray workers, niced like every Ray worker on this shared machine (other sessions' too):
# one per core left the node under HOT_CPU too often
HOGS_PER_CORE = 3
THREADS = 8  # clients: 2 × max_batch, so both replicas' batches are full and the caps bind
NEW_TOKENS = 16
WINDOW = 150  # requests per share measurement
REACTION_S = 15.0  # the issue: the share drops within 15 s of the hog
# Four cuts (0.24). With 8 in flight on one coordinator the hot replica's cap is
# ceil(1.25 × 8 × w / (w + 1)): 5 at w = 0.7 and 4 at 0.49 (its half of the load: nothing moves), 3 at
# 0.34 (a share near 3/8, a drop of only ~25 % from 1/2), 2 at 0.24 (near 1/4: the 30 % drop asked for).
# At hot_s = 2 four cuts take 8 s of a hot node, inside REACTION_S.
CUT_WEIGHT = 0.3


def service_config(checkpoint, port: int) -> dict:
    return {
        "model": {"path": str(checkpoint)},
        # one stage: each replica sits on one node (kept off each other's), so a hogged node is one replica's
        "pipeline": {"stages": 1, "max_batch": 4, "max_seq_len": 128, "torch_threads": 1},
        "replicas": {"count": 2, "standby": 0},
        # one coordinator: bounded loads count each coordinator's own in-flight requests, and with two
        # each would see half the load, where the caps' rounding (ceil) hides a weight change
        "server": {"port": port, "http_port": free_port(), "coordinators": 1},
        "failover": {
            # neither a failover nor a slow-node pause may stand in for the weight: a hog on a shared
            # 2-core machine can stretch heartbeats, so the timeout is generous and pausing is off
            "heartbeat": {"timeout_s": 10, "slow": {"max_paused_fraction": 0}},
            # the rule of failover/adaptive.py, faster; idle_cpu 0: no sample is idle, so every one
            # that is not hot counts toward recovery (an idle run would hold a cut weight, see the report)
            "adaptive": {"hot_cpu": HOT_CPU, "hot_s": 2, "recover_s": 2, "idle_cpu": 0.0, "idle_s": 600,
                         "stale_s": 5},
        },
    }


@pytest.fixture(scope="module")
def served(make_checkpoint, tmp_path_factory):
    """(gRPC target, Ray address, env) of `ringpipe serve --nodes 3`; stopped with Ctrl-C after."""
    checkpoint = make_checkpoint("llama", tokenizer=True, vocab=VOCAB, layers=2, hidden=64)
    config = service_config(checkpoint, free_port())
    with ringpipe_serve(config, tmp_path_factory.mktemp("adaptive"), nodes=3) as serving:
        coordinator_off_the_replicas_nodes(serving.pid, serving.target)
        yield serving.target, serving.address, serving.env


def ray_workers(root_pid: int, title: str) -> list[tuple[int, int]]:
    """(pid, node's raylet pid) of each Ray worker under `root_pid` whose process title starts with `title`."""
    out = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(title) and proc.status() != psutil.STATUS_ZOMBIE:
                out.append((proc.pid, proc.ppid()))  # a worker's parent is its node's raylet
        except psutil.NoSuchProcess:
            continue
    return out


def coordinator_off_the_replicas_nodes(server_pid: int, target: str, timeout_s: float = 180) -> None:
    """The coordinator runs under its node's raylet, so its CPU (as much as a stage's under this load)
    counts as that node's, and Serve puts it (SPREAD) on any node: on a replica's, that node would look
    hot without a hog. Until it runs elsewhere (the head, or the spare worker node), its process is
    killed and Serve starts another, on the next node."""
    deadline = time.monotonic() + timeout_s
    while True:
        replica_nodes = {node for _, node in ray_workers(server_pid, "ray::StageActor")}
        assert len(replica_nodes) == 2, "each replica on a node of its own"
        coordinators = ray_workers(server_pid, "ray::ServeReplica:ringpipe:Coordinator")
        if len(coordinators) == 1 and coordinators[0][1] not in replica_nodes:
            with Client(target) as client:
                client.status()  # answers: Serve routes to it
            return
        assert time.monotonic() < deadline, f"the coordinator stayed on a replica's node: {coordinators}"
        killed = {pid for pid, node in coordinators if node in replica_nodes}
        for pid in killed:
            os.kill(pid, signal.SIGKILL)

        def replaced(killed: set[int] = killed) -> bool:
            now = {pid for pid, _ in ray_workers(server_pid, "ray::ServeReplica:ringpipe:Coordinator")}
            return len(now) == 1 and not now & killed

        wait_for(replaced, 120, "Serve to start a new coordinator")


class Load:
    """Clients in threads, each sending one request after another: a random prompt, a random session."""

    def __init__(self, target: str, threads: int) -> None:
        self.requests: list[list] = []  # [start (monotonic), replica that served it, or None while running]
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(target, seed), daemon=True)
                         for seed in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _run(self, target: str, seed: int) -> None:
        rng = random.Random(seed)
        with Client(target) as client:
            while not self._stop.is_set():
                prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(4, 12))]
                request = [time.monotonic(), None]
                self.requests.append(request)
                try:
                    done = client.generate(prompt, NEW_TOKENS, session_id=f"s{rng.getrandbits(64):x}",
                                           ignore_eos=True, timeout_s=120)
                except Exception as exc:  # noqa: BLE001 — asserted by the test: no request may fail
                    self.errors.append(exc)
                    request[1] = "(failed)"
                    continue
                request[1] = done.replica_id

    def shares(self, since: float, n: int = WINDOW, timeout_s: float = 300) -> dict[str, float]:
        """Each replica's share of the first `n` requests started at or after `since`, once all are done."""
        def window() -> list[list]:
            return [r for r in list(self.requests) if r[0] >= since][:n]

        wait_for(lambda: len(w := window()) == n and all(r[1] for r in w), timeout_s, f"{n} requests")
        assert not self.errors, self.errors[:3]
        counts = Counter(r[1] for r in window())
        return {replica: count / n for replica, count in counts.items()}


def replicas(client: Client) -> dict[str, admin_pb2.ReplicaStatus]:
    return {r.replica_id: r for r in client.status().replicas}


def wait_until_weights(client: Client, condition, timeout_s: float, what: str) -> None:
    """Until `condition({replica: (weight, reason)})` holds in the status; the last weights seen if never."""
    seen: list[dict] = [{}]

    def holds() -> bool:
        seen[0] = {r.replica_id: (r.weight, r.weight_reason) for r in replicas(client).values()}
        return condition(seen[0])

    try:
        wait_for(holds, timeout_s, f"weights: {what}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen[0]}") from None


# A Ray driver of the service's cluster: `count` tasks pinned to the node, each a worker process under
# the node's raylet that writes its pid to the directory, waits for the file "go" there, then spins; all
# end `seconds` after they started, or when this driver ends (Ray then ends its job's workers).
HOG = """
import os, sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

address, node, count, seconds, directory = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
ray.init(address=address, log_to_driver=False, configure_logging=False)

@ray.remote(num_cpus=0, max_retries=0)
def spin() -> None:
    until = time.monotonic() + seconds
    open(os.path.join(directory, str(os.getpid())), "w").close()
    while not os.path.exists(os.path.join(directory, "go")) and time.monotonic() < until:
        time.sleep(0.02)
    while time.monotonic() < until:
        pass

on_node = NodeAffinitySchedulingStrategy(node, soft=False)
ray.get([spin.options(scheduling_strategy=on_node).remote() for _ in range(count)])
"""


class CpuHog:
    """Busy processes on one node, started idle (a worker's start is itself CPU on the node) so that
    `start()` makes them all spin at once; they end when the block does, and at most `max_s` after."""

    def __init__(self, address: str, node_id: str, directory, env: dict, max_s: float = 300) -> None:
        self.count = HOGS_PER_CORE * (os.cpu_count() or 1)
        self.directory, self.log = directory, directory.with_suffix(".log")
        directory.mkdir()
        with open(self.log, "w") as log:
            self.driver = subprocess.Popen(
                [sys.executable, "-c", HOG, address, node_id, str(self.count), str(max_s), str(directory)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def pids(self) -> list[int]:
        return [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()]

    def __enter__(self) -> CpuHog:
        try:
            def ready() -> bool:
                assert self.driver.poll() is None, self.log.read_text()[-3000:]
                return len(self.pids()) == self.count

            wait_for(ready, 180, f"{self.count} hog processes, idle")
        except BaseException:
            self.__exit__()
            raise
        return self

    def start(self) -> float:
        """Every hog spins from now on; returns when that was."""
        raylet = psutil.Process(self.pids()[0]).ppid()  # a worker's parent is its node's raylet
        self._node = NodeCpu(raylet, mode="tree")  # the node's CPU as its stages measure it
        (self.directory / "go").touch()
        return time.monotonic()

    def node_cpu(self) -> float:
        """The node's CPU utilisation since `start` (or the previous call)."""
        return self._node.sample()

    def __exit__(self, *exc: object) -> None:
        self.driver.terminate()
        try:
            self.driver.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.driver.pid, signal.SIGKILL)
            self.driver.wait(30)

        def gone() -> bool:
            return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                           for p in self.pids())

        try:
            wait_for(gone, 30, "the hog processes to end with their driver")
        finally:
            for pid in self.pids():  # never leave a busy loop behind, whatever failed above
                if psutil.pid_exists(pid):
                    os.kill(pid, signal.SIGKILL)


def test_cpu_hog_lowers_a_replicas_share_of_new_requests_and_it_comes_back(served, tmp_path):
    """Before: each replica's share of new requests under a steady load. A hog on replica-0's node:
    within 15 s its weight is cut four times, with a reason naming the node's CPU in the status, and from
    then on its share is at most 70 % of what it was; the other replica's weight is untouched. The hog
    stopped: the weight is back to 1.0 and the share back to at least 80 % of before. No request fails,
    no replica fails over or is paused."""
    target, address, env = served
    with Client(target) as client, Load(target, THREADS) as load:
        first = replicas(client)
        assert len(first) == 2 and all(r.state == admin_pb2.REPLICA_STATE_SERVING for r in first.values())
        hot, cold = sorted(first)
        node = first[hot].stages[0].node_id
        assert node != first[cold].stages[0].node_id  # one replica per node: the hog is hot's only

        with CpuHog(address, node, tmp_path / "hog", env) as hog:
            # loading the weights, and the hog's idle workers starting, can run a node hot for a while
            wait_until_weights(client, lambda weights: all(w == 1.0 for w, _ in weights.values()), 120,
                               "both at 1.0")
            before = load.shares(time.monotonic())
            print(f"before: {before}")

            started = hog.start()
            try:
                wait_until_weights(client, lambda weights: weights[hot][0] < CUT_WEIGHT, REACTION_S,
                                   f"{hot}'s below {CUT_WEIGHT} within {REACTION_S:.0f}s of the hog")
            except AssertionError as exc:  # say whether the hog heated its node (the machine is shared)
                raise AssertionError(f"{exc}; the node's CPU meanwhile {hog.node_cpu():.0%} "
                                     f"(hot above {HOT_CPU:.0%})") from None
            cut = time.monotonic()
            during = load.shares(cut)
            now = replicas(client)  # what `ringpipe status` shows
            print(f"weight below {CUT_WEIGHT} {cut - started:.1f}s after the hog started; during: {during}; "
                  f"weights now: { {r: (s.weight, s.weight_reason) for r, s in now.items()} }")

        assert now[hot].weight < 1.0 and "CPU" in now[hot].weight_reason, now[hot]
        assert now[cold].weight == 1.0 and now[cold].weight_reason == "", now[cold]  # the hog is not its node's
        assert during.get(hot, 0.0) <= 0.7 * before[hot], (before, during)

        wait_until_weights(client, lambda weights: weights[hot] == (1.0, ""), 120, f"{hot}'s back to 1.0")
        after = load.shares(time.monotonic())
        print(f"after: {after}")
        assert after.get(hot, 0.0) >= 0.8 * before[hot], (before, after)

        # nothing but the weight moved the work: no failover, both replicas served throughout
        status = client.status()
        assert not status.failovers, status.failovers
        assert {r.replica_id: (r.state, r.epoch) for r in status.replicas} == {
            r: (admin_pb2.REPLICA_STATE_SERVING, s.epoch) for r, s in first.items()}
