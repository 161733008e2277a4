"""Replicas kept on disjoint nodes: hard where the cluster has room, soft where it does not.

Real placement groups on the session's multi-node local Ray cluster (a head without CPUs and 3
worker nodes); no stage actor is started.
"""

from __future__ import annotations

import threading
import time

import pytest
from ray.util.placement_group import placement_group, remove_placement_group

from shards.replica import Replica, fits_off
from shards.spec import ReplicaSpec


def workers(ray) -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)


def free_cpus(node: str) -> float:
    from ray._private.state import available_resources_per_node

    return available_resources_per_node().get(node, {}).get("CPU", 0.0)


@pytest.fixture(scope="module")
def spec(make_checkpoint) -> ReplicaSpec:
    return ReplicaSpec(model_dir=str(make_checkpoint("llama", layers=2)), stages=2, placement_strategy="SPREAD")


def test_room_is_judged_on_the_nodes_outside_those_avoided(ray_cluster):
    nodes = workers(ray_cluster)
    assert len(nodes) == 3
    two = [{"CPU": 1.0}] * 2
    assert fits_off(frozenset(nodes[:1]), two)
    assert not fits_off(frozenset(nodes), two)  # no worker left
    assert not fits_off(frozenset(nodes[:2]), two, distinct=True)  # one node left, two bundles apart
    assert not fits_off(frozenset(nodes[:2]), [{"CPU": 7.0}])  # bigger than any node


def test_a_replica_waits_for_room_off_the_avoided_nodes_when_the_cluster_has_it(ray_cluster, spec):
    """The nodes it may use are full for a while (as when a dead replica is being retired), longer
    than the soft wait: it waits, and lands on them, not on the avoided node that has room."""
    nodes = workers(ray_cluster)
    avoid, others = frozenset(nodes[:1]), nodes[1:]
    assert free_cpus(nodes[0]) >= 2  # the avoided node could take it: only the rule keeps it off
    held = [(n, free_cpus(n)) for n in others]
    blocker = placement_group([{"CPU": cpus} for _, cpus in held if cpus > 0], strategy="SPREAD",
                              bundle_label_selector=[{"ray.io/node-id": n} for n, cpus in held if cpus > 0])
    ray_cluster.get(blocker.ready(), timeout=60)
    replica, placed = Replica(spec), []
    try:
        placing = threading.Thread(target=lambda: placed.extend(replica.place(60, avoid, avoid_wait_s=3.0)))
        placing.start()
        time.sleep(6.0)  # twice the soft wait
        assert placing.is_alive()  # still waiting for room off the avoided node
        remove_placement_group(blocker)
        placing.join(60)
        assert len(placed) == 2 and not set(placed) & avoid, placed
    finally:
        remove_placement_group(blocker)
        replica.shutdown()


def test_a_replica_shares_nodes_when_the_cluster_has_no_room_apart(ray_cluster, spec):
    nodes = workers(ray_cluster)
    replica = Replica(spec)
    try:
        placed = replica.place(60, frozenset(nodes), avoid_wait_s=1.0)
        assert len(placed) == 2 and set(placed) <= set(nodes)  # placed all the same, on avoided nodes
    finally:
        replica.shutdown()
