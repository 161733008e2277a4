"""Replicas kept on disjoint nodes: waited for where the nodes outside the avoided ones are big enough
but busy, placed anywhere where they are too small.

Real placement groups on the session's multi-node local Ray cluster (a head without CPUs and 3
worker nodes); no stage actor is started.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from ray.util.placement_group import placement_group, remove_placement_group

from cluster.chaos import kill_node
from shards.replica import Replica, fits_off
from shards.spec import ReplicaSpec
from tests.reference import starting_nodes


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
    """The nodes it may use are full for a while (as when a dead replica is being retired): it waits,
    and lands on them, not on the avoided node that has room."""
    nodes = workers(ray_cluster)
    avoid, others = frozenset(nodes[:1]), nodes[1:]
    assert free_cpus(nodes[0]) >= 2  # the avoided node could take it: only the rule keeps it off
    # every CPU of the other nodes held (not what looks free now: an earlier test's actors may still be
    # giving theirs back)
    total = {n["NodeID"]: n["Resources"]["CPU"] for n in ray_cluster.nodes() if n["NodeID"] in others}
    blocker = placement_group([{"CPU": total[n]} for n in others], strategy="SPREAD",
                              bundle_label_selector=[{"ray.io/node-id": n} for n in others])
    ray_cluster.get(blocker.ready(), timeout=60)
    replica, placed = Replica(spec), []
    try:
        placing = threading.Thread(target=lambda: placed.extend(replica.place(60, avoid, hard_wait_s=60)))
        placing.start()
        time.sleep(3.0)
        assert placing.is_alive()  # still waiting for room off the avoided node
        remove_placement_group(blocker)
        placing.join(60)
        assert len(placed) == 2 and not set(placed) & avoid, placed
    finally:
        remove_placement_group(blocker)
        replica.shutdown()


@pytest.mark.parametrize("avoided", [3, 2], ids=["every-node", "all-but-a-node-too-small"])
def test_a_replica_shares_nodes_when_the_cluster_has_no_room_apart(ray_cluster, spec, avoided):
    """Off the avoided nodes it cannot fit even once they are empty (no node left, or one node too small
    for both stages' 4 CPUs each): it is placed anywhere, without the wait kept for room that is
    coming back (600 s here; the call is given 120 s)."""
    nodes = workers(ray_cluster)
    big = dataclasses.replace(spec, cpus_per_stage=4.0) if avoided == 2 else spec
    replica, placed = Replica(big), []
    try:
        placing = threading.Thread(target=lambda: placed.extend(replica.place(600, frozenset(nodes[:avoided]),
                                                                               hard_wait_s=600)))
        placing.start()
        placing.join(120)
        assert not placing.is_alive(), "still waiting for room off the avoided nodes that cannot come"
        assert len(placed) == 2 and set(placed) <= set(nodes), placed
        if avoided == 2:
            assert set(placed) & set(nodes[:2]), placed  # placed on an avoided node: the third is too small
    finally:
        replica.shutdown()


def test_a_replica_stops_waiting_for_a_node_found_dead(local_cluster, ray_cluster, spec):
    """The only node outside the avoided ones dies as the replica starts waiting for it (as when a
    rebuild follows a node's loss before Ray's health checks have noticed it): once Ray finds the node
    dead, it is placed on the others, without the wait kept for room that is coming back (600 s)."""
    nodes = workers(ray_cluster)
    with starting_nodes():
        extra = local_cluster.add_node(node_ip_address="127.0.0.1", object_store_memory=128 << 20, num_cpus=6)
    local_cluster.wait_for_nodes()
    kill_node(local_cluster, extra.node_id)
    replica, placed = Replica(spec), []
    try:
        assert fits_off(frozenset(nodes), [{"CPU": 1.0}] * 2)  # Ray still counts the dead node alive
        placing = threading.Thread(target=lambda: placed.extend(replica.place(600, frozenset(nodes), hard_wait_s=600)))
        placing.start()
        placing.join(120)  # Ray's health checks take ~15 s
        assert not placing.is_alive(), "still waiting for room on a dead node"
        assert len(placed) == 2 and set(placed) <= set(nodes), placed
    finally:
        replica.shutdown()
