"""Chaos tooling: break a running ringpipe service the ways real clusters break.

Each function takes the controller's handle (`ray.get_actor(CONTROLLER_NAME,
namespace=NAMESPACE)`) and a ring position (`replica-0` …), finds what serves
it now, and breaks that: kill a stage actor (a crashed process), pause its
process with SIGSTOP (a hung one, or one cut off by a partition; SIGCONT brings
it back), delay its heartbeats (a slow host), kill a whole worker node (its
raylet and every worker on it), or kill the controller itself. Used by the
failover tests and benchmarks; the process signals only work on the machine
that runs the stage (a local cluster).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import ray

from failover.controller import NAMESPACE


@dataclass(frozen=True)
class StageProcess:
    replica_id: str
    epoch: int
    pipeline: str
    stage: int
    actor_name: str
    node_id: str
    pid: int


def stage_process(controller, replica_id: str, stage: int) -> StageProcess:
    """Where stage `stage` of the pipeline now at ring position `replica_id` runs."""
    membership = ray.get(controller.membership.remote())
    member = membership.get(replica_id)
    if member is None:
        raise LookupError(f"{replica_id} is not in the membership (epoch {membership.epoch})")
    nodes = ray.get(controller.pipeline_nodes.remote())[member.pipeline]
    tp = len(nodes) // len(member.stages)
    where = nodes[stage * tp]
    return StageProcess(
        replica_id, member.epoch, member.pipeline, stage, f"{member.pipeline}.stage-{stage}.tp0",
        where["node_id"], where["pid"],
    )


def kill_stage(target: StageProcess) -> None:
    """A crash: the stage's actor process is killed."""
    ray.kill(ray.get_actor(target.actor_name, namespace=NAMESPACE), no_restart=True)


def pause_stage(target: StageProcess) -> None:
    """A hang (or a partition): the stage's process stops running until `resume_stage`."""
    os.kill(target.pid, signal.SIGSTOP)


def resume_stage(target: StageProcess) -> None:
    try:
        os.kill(target.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # killed while paused: the controller shut it down after the takeover


def slow_stage(target: StageProcess, delay_s: float, duration_s: float) -> None:
    """A slow host: the stage answers heartbeats `delay_s` late for `duration_s`."""
    actor = ray.get_actor(target.actor_name, namespace=NAMESPACE)
    ray.get(actor.slow_heartbeats.remote(delay_s, duration_s))


def kill_node(cluster, node_id: str) -> None:
    """A node failure on a local multi-node cluster (`ray.cluster_utils.Cluster`): its raylet and workers die."""
    node = next((n for n in cluster.worker_nodes if n.node_id == node_id), None)
    if node is None:
        raise LookupError(f"node {node_id} is not a worker node of this local cluster")
    cluster.remove_node(node, allow_graceful=False)


def kill_controller(controller, timeout_s: float = 60.0) -> None:
    """The controller's process dies; Ray restarts it and it recovers membership from the registry.

    Returns once a new incarnation answers (TimeoutError after `timeout_s`)."""
    old = ray.get(controller.incarnation.remote())
    ray.kill(controller, no_restart=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ray.get(controller.incarnation.remote(), timeout=5) != old:
                return
        except ray.exceptions.RayError:
            pass  # restarting
        time.sleep(0.1)
    raise TimeoutError(f"the controller did not come back within {timeout_s:.0f}s")
