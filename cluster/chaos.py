"""Chaos tooling: break a running ringpipe service the ways real clusters break.

Stage faults take the controller's handle (`ray.get_actor(CONTROLLER_NAME,
namespace=NAMESPACE)`) and a ring position (`replica-0` …), find what serves
it now, and break that: kill a stage actor (a crashed process), pause its
process with SIGSTOP (a hung one, or one cut off by a partition; SIGCONT brings
it back), delay its heartbeats (a slow host), or kill the controller itself.
The process signals of these only work on the machine that runs the stage.

Node faults work on any cluster: `node_fault` runs a Ray task on the node that
starts `cluster.node_fault` there, which kills the node's raylet and every
process under it, pauses them all, hogs its CPUs, or (a node in a network
namespace of its own, `ringpipe serve --nodes N --netns`) cuts its links.
`restart_node` starts a new node like a dead one on this machine (local
clusters, where no autoscaler brings nodes back), in the dead one's namespace
if it had one. `ringpipe chaos` (cluster/chaos_run.py) drives these.
"""

from __future__ import annotations

import os
import signal
import threading
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


def throttle_stage(target: StageProcess, run_s: float, stop_s: float, duration_s: float,
                   done: threading.Event | None = None) -> threading.Thread:
    """A throttled host, as a cgroup CPU quota throttles one: for `duration_s`, or until `done` is set,
    the stage's process runs `run_s` of every `run_s + stop_s` (SIGSTOP, SIGCONT), so its steps and its
    answers to pings are late, and nothing else on the machine is. On this machine's processes (a local
    cluster); returns the thread doing it (it ends with the process running)."""

    def throttle() -> None:
        until = time.monotonic() + duration_s
        try:
            while time.monotonic() < until and not (done is not None and done.is_set()):
                os.kill(target.pid, signal.SIGSTOP)
                time.sleep(stop_s)
                os.kill(target.pid, signal.SIGCONT)
                time.sleep(run_s)
        except ProcessLookupError:
            pass
        finally:
            resume_stage(target)

    thread = threading.Thread(target=throttle, name=f"throttle-{target.pid}", daemon=True)
    thread.start()
    return thread


def kill_node(cluster, node_id: str) -> None:
    """A node failure on a local multi-node cluster (`ray.cluster_utils.Cluster`): its raylet and workers die."""
    node = next((n for n in cluster.worker_nodes if n.node_id == node_id), None)
    if node is None:
        raise LookupError(f"node {node_id} is not a worker node of this local cluster")
    cluster.remove_node(node, allow_graceful=False)


HEAD_RESOURCE = "node:__internal_head__"


def worker_nodes() -> list[dict]:
    """The live nodes other than the head (`ray.nodes()` entries): the ones chaos may break."""
    return [n for n in ray.nodes() if n["Alive"] and HEAD_RESOURCE not in n["Resources"]]


@ray.remote(num_cpus=0, max_retries=0)
def _start_node_fault(action: str, seconds: float) -> dict:
    import subprocess
    import sys

    import psutil

    raylet = psutil.Process(os.getppid())  # a worker's parent is its node's raylet
    if "raylet" not in raylet.name():
        raise RuntimeError(f"this worker's parent is {raylet.name()!r}, not a raylet")
    if action == "partition":  # refused here, where the task can say why, not in the process started
        from cluster.netns import in_own_namespace, own_links

        if not in_own_namespace() or not own_links():
            raise RuntimeError("partition-node needs nodes in network namespaces of their own (`ringpipe serve "
                               "--nodes N --netns`); on a real cluster drop the node's traffic with firewall rules")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.node_fault", action, str(raylet.pid), str(seconds)],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return {"raylet_pid": raylet.pid, "fault_pid": proc.pid}


def node_fault(node_id: str, action: str, seconds: float = 0.0, timeout_s: float = 30.0) -> dict:
    """`action` ("kill", "pause", "slow", "partition") on the node `node_id`, from a task placed there;
    returns once started."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = _start_node_fault.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    return ray.get(task.remote(action, seconds), timeout=timeout_s)


def restart_node(node: dict, gcs_address: str, log: str | None = None):
    """Start a node like `node` (the `ray.nodes()` entry of a dead one: its address and resources) on
    this machine, joined to `gcs_address`; returns the `cluster.local_node` process (SIGTERM stops the node)."""
    import json
    import subprocess
    import sys

    resources = node["Resources"]
    spec = {
        "ip": node["NodeManagerAddress"],
        "num_cpus": int(resources.get("CPU", 0)),
        "num_gpus": int(resources.get("GPU", 0)),
        "resources": {k: v for k, v in resources.items()
                      if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")},
        "object_store_memory": int(resources.get("object_store_memory", 200 << 20)),
    }
    from cluster.netns import namespace_of

    argv = [sys.executable, "-m", "cluster.local_node", gcs_address, json.dumps(spec)]
    namespace = namespace_of(spec["ip"])
    if namespace is not None:
        argv = ["ip", "netns", "exec", namespace, *argv]
    out = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115 — the child holds it
    return subprocess.Popen(
        argv,
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
    )


def coordinator_replicas() -> list[str]:
    """The names of the coordinator's Serve replica actors (namespace "serve")."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::ringpipe#"))


def kill_coordinator(name: str) -> None:
    """A coordinator replica's process dies; Serve starts another."""
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def controller_pid() -> int:
    """The process id of the live controller actor (it can be signalled from its own machine only)."""
    from failover.controller import CONTROLLER_NAME

    controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    return ray.get(controller.health.remote(), timeout=30)["pid"]


def pause_controller(seconds: float) -> None:
    """A stalled controller: its process is stopped (SIGSTOP) for `seconds`, then continued."""
    pid = controller_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


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
