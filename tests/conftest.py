"""Fixtures shared by every test package, among them the one local Ray cluster of the session."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1

import random
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.config import parse_config
from shards.create import RandomModelSpec, create_random_checkpoint


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_checkpoint(arch, **spec_overrides) -> Path`: a random-weight HF checkpoint.

    Built once per distinct arguments for the whole session, so callers must treat the
    directory as read-only (copy it first to damage it). `max_shard_bytes` is passed to
    `create_random_checkpoint`, and so is `tokenizer` (True adds a tokenizer.json); every other keyword overrides a `RandomModelSpec` field.
    """
    built: dict[tuple, Path] = {}

    def make(arch: str, max_shard_bytes: int | None = None, tokenizer: bool = False, **spec_overrides: object) -> Path:
        key = (arch, max_shard_bytes, tokenizer, tuple(sorted(spec_overrides.items())))
        if key not in built:
            spec = RandomModelSpec(arch=arch, **spec_overrides)
            directory = tmp_path_factory.mktemp(f"{arch}-checkpoint")
            built[key] = create_random_checkpoint(directory, spec, max_shard_bytes, tokenizer)
        return built[key]

    return make


@pytest.fixture(scope="session")
def local_cluster():
    """The session's real multi-node Ray cluster on 127.0.0.1: a head (no CPUs) and 3 worker nodes
    of 6 CPUs, each its own raylet (`ray.cluster_utils.Cluster`), so tests can kill a node."""
    import ray

    from cluster.local import start_local_cluster
    from tests.reference import starting_nodes

    with starting_nodes():
        cluster = start_local_cluster(nodes=3, cpus_per_node=6)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(local_cluster):
    """The `ray` module, connected to the session's cluster."""
    import ray

    return ray


VOCAB = 512
MAX_BATCH, MAX_QUEUE, REPLICAS, STANDBY = 4, 28, 2, 1  # 2 × (4 + 28) = 64 requests fit at once


def free_port(count: int = 1) -> int:
    """A free loopback port from 20000-32767 (the first of `count` free in a row): below the kernel's
    ephemeral range (where bind(0) and every outgoing connection draw from, so a port picked there
    can be taken before Serve binds it) and above Ray's worker ports (10002-19999)."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32768 - count)
        if all(_free(p) for p in range(port, port + count)):
            return port


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="session")
def service_checkpoint(make_checkpoint):
    return make_checkpoint("llama", tokenizer=True, vocab=VOCAB, layers=4, hidden=64)


@pytest.fixture(scope="session")
def service(ray_cluster, service_checkpoint):
    """The session's ringpipe service: 2 replicas × 2 stages + 1 standby, 2 coordinators, gRPC on a
    free loopback port, default heartbeats; no auth. Failover tests kill parts of it and wait until
    it has converged back before they end."""
    from cluster.serve import start_service

    cfg = parse_config({
        "model": {"path": str(service_checkpoint)},
        "pipeline": {"stages": 2, "max_batch": MAX_BATCH, "max_queue": MAX_QUEUE, "max_seq_len": 512,
                     "prefill_chunk": 32},
        "replicas": {"count": REPLICAS, "standby": STANDBY},
        "server": {"port": free_port(), "http_port": free_port(), "coordinators": 2, "max_new_tokens": 480},
    })
    svc = start_service(cfg, progress=False)
    yield svc
    svc.shutdown()


# `make test` runs two pytest-xdist workers: on the second, in this order, the modules that start a
# small cluster of their own and spend about half their time waiting (on SSH, on process start-up, on
# Ray's teardown polls: the machine measured 0.5 busy through each, against 0.8-0.9 for the chaos and
# failover tests); on the first, everything else in the order below. `ray up` goes first, so its
# cluster starts while the first worker runs unit tests. Either worker starts Ray nodes only holding
# `tests.reference.starting_nodes`, so no node starts beside another cluster's start-up.
SIDE = ("tests/cluster/test_ray_up.py", "tests/cluster/test_cli.py", "tests/cluster/test_deploy.py")


def pytest_xdist_make_scheduler(config, log):
    """Two work units, each whole on one worker: the `SIDE` modules, and everything else in its order.
    (xdist's `--dist loadgroup` would do it with markers, but under pytest 9 it groups nothing.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SideAndMain(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "side" if nodeid.split("::")[0] in SIDE else "main"

    return SideAndMain(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `SIDE` modules first; then modules that need no session cluster (those that start no
    multi-node cluster of their own first among them), then those on the bare cluster, then those on
    the service: the session's cluster and service stay up once started, and an idle service's Ray
    processes alone keep a fifth of this machine's 2 cores busy, slowing every test after it."""
    rank: dict[str, tuple[int, int]] = {}
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        level = 2 if "service" in uses else 1 if uses & {"local_cluster", "ray_cluster"} else 0
        module = item.nodeid.split("::")[0]
        slow = item.get_closest_marker("slow") is not None
        rank[module] = max(rank.get(module, (0, 0)), (level, int(slow)))
    for i, module in enumerate(SIDE):  # first, in their order (under xdist: on a worker of their own)
        rank[module] = (-1, i)
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])  # stable: file order within a rank


def pytest_sessionfinish(session: pytest.Session) -> None:
    if session.config.pluginmanager.has_plugin("dsession"):
        return  # xdist's controller: it starts no nodes, and has not the run id its workers name the lock by
    from tests.reference import NODES_LOCK

    NODES_LOCK.unlink(missing_ok=True)  # whichever worker ends last; a worker still running holds it open
