"""A worker node on this machine, joined to a running cluster: `python -m cluster.local_node GCS_ADDRESS SPEC_JSON`.

What `ray start --address ... --block` does, for a node on a loopback address:
`ray start` refuses to join a cluster when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
and without it Ray moves 127.0.0.1 to the machine's outward address. So, like
`ray.cluster_utils`, this starts the node's processes in-process, then waits:
SIGTERM or SIGINT stops them all, and the node's raylet dying ends it too.
SPEC_JSON: {"ip", "num_cpus", "num_gpus", "resources", "object_store_memory"}.
`ringpipe chaos --restart-nodes` uses it to bring a killed node back.
`ray._private.node.Node` is private: called (not patched) the way
`ray.cluster_utils` calls it, checked on Ray 2.60.0, the minor version
`cluster.local.check_ray` enforces; Ray has no public way to join a node on a
loopback address to a running cluster.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main(gcs_address: str, spec: dict) -> None:
    import ray._private.node
    from ray._private.parameter import RayParams

    params = RayParams(
        node_ip_address=spec["ip"], gcs_address=gcs_address, num_cpus=spec["num_cpus"],
        num_gpus=spec.get("num_gpus", 0), resources=spec.get("resources") or {},
        object_store_memory=spec.get("object_store_memory"), min_worker_port=0, max_worker_port=0,
        node_manager_port=0, include_log_monitor=False, dashboard_agent_listen_port=None,
    )
    try:
        node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    except Exception as exc:  # noqa: BLE001 — e.g. the raylet not registered within Ray's 30 s
        # the processes it did start would outlive us as a half-joined node: stop them, and exit 1
        # so that whoever started us may try again
        import psutil

        children = psutil.Process().children(recursive=True)
        for child in children:
            child.kill()
        psutil.wait_procs(children, timeout=10)
        print(f"node on {spec['ip']} failed to join {gcs_address}: {exc}", flush=True)
        sys.exit(1)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"node {node.node_id} on {spec['ip']} joined {gcs_address}", flush=True)
    try:
        while not stop.wait(1.0):
            if not node.remaining_processes_alive():
                break
    finally:
        node.kill_all_processes(check_alive=False, allow_graceful=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
