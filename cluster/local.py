"""Joining a Ray cluster, or starting the embedded local one on loopback.

Ray rewrites 127.0.0.1 to the machine's outward address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before Ray is imported; the local
mode sets it, so an embedded cluster listens on 127.0.0.1 only.

Serve's gRPC proxy has no host option: it binds `[::]:port`, every interface.
The local mode (and `ringpipe deploy`) therefore gives its job a worker setup
hook (`serve_on_loopback`) that, on a node whose address is a loopback one
(127.0.0.1 here, 127.0.0.2… for the nodes of a test cluster from `ray up`),
rewrites that address to the node's own in the proxy's process, through the
function Serve names as its extension point for it (`default_impl.add_grpc_address`).
Every Serve replica also opens an internal gRPC server on `[::]:0`; the same
hook moves it to the node's address (`replica.add_port_to_grpc_server`).
The hook runs in every worker of the job, so it only arms an import hook: the
patch happens if and when a worker imports that module (the proxy does).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

LOOPBACK = "127.0.0.1"
# the job's runtime env: every worker runs `serve_on_loopback` first (ringpipe is installed on every node)
LOOPBACK_HOOK = {"worker_process_setup_hook": "cluster.local.serve_on_loopback"}


def prepare_local(address: str | None = None) -> None:
    """Before Ray is first imported: keep a local cluster, or one joined on a loopback address, on
    loopback (Ray reads this at import; else it rewrites 127.0.0.1 to the machine's outward address)."""
    address = address or os.environ.get("RAY_ADDRESS")
    host = (address or "").removeprefix("ray://").rsplit(":", 1)[0]
    if not address or host.startswith("127.") or host == "localhost":
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class NoRayCluster(Exception):
    """Nothing answers at the Ray address given (Ray itself would retry for minutes)."""


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise NoRayCluster unless a GCS-like port answers at `address` ("host:port"; others pass)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray finds the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise NoRayCluster(f"no Ray cluster at {address} ({exc.strerror or exc}): start one "
                           "(`ray start --head`, `ringpipe serve`) or pass its address") from exc


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> str:
    """Connect to `address` (or RAY_ADDRESS) when given, else start a local Ray on 127.0.0.1.

    Returns "joined" or "local"; a Ray already initialised in this process is reused.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    prepare_local(address)
    import ray

    if ray.is_initialized():
        return "joined"
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=not quiet, runtime_env=LOOPBACK_HOOK)
        return "joined"
    cores = os.cpu_count() or 1
    ray.init(
        address="local",  # a new cluster even when another local one (`serve --nodes`) is up
        num_cpus=num_cpus or max(cores, 16),  # logical CPUs: stages share cores, torch threads are set per stage
        include_dashboard=False,
        _node_ip_address=LOOPBACK,
        log_to_driver=not quiet,
        configure_logging=not quiet,
        runtime_env=LOOPBACK_HOOK,
    )
    return "local"


def start_local_cluster(nodes: int, cpus_per_node: int | None = None, quiet: bool = True):
    """A head and `nodes` worker nodes, each a real raylet on 127.0.0.1, and this process connected.

    The head gets no CPUs, so stages are placed on the worker nodes (and killing one is
    a real node failure); the controller, Serve and the coordinators need none and stay
    wherever Ray puts them. Returns the `ray.cluster_utils.Cluster`; `shutdown()` it after
    `ray.shutdown()`.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be ≥ 1, got {nodes}")
    prepare_local()
    import ray
    from ray.cluster_utils import Cluster

    cpus = cpus_per_node or max(os.cpu_count() or 1, 6)
    node_args = {"node_ip_address": LOOPBACK, "object_store_memory": 256 << 20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node_args, "num_cpus": 0, "include_dashboard": False},
    )
    try:
        for _ in range(nodes):
            cluster.add_node(**node_args, num_cpus=cpus)
        cluster.wait_for_nodes()
        ray.init(
            address=cluster.address,
            log_to_driver=not quiet,
            configure_logging=not quiet,
            runtime_env=LOOPBACK_HOOK,
        )
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def _on_loopback(address: str) -> str:
    """`[::]:port` (every interface) as the node's own address, on a node whose address is a loopback one."""
    import ray

    node_ip = ray.util.get_node_ip_address() if ray.is_initialized() else LOOPBACK
    return address.replace("[::]", node_ip, 1) if node_ip.startswith("127.") else address


def _patch_proxy(module) -> None:
    """Serve's gRPC proxy binds through `default_impl.add_grpc_address`."""
    def add_grpc_address(server, address: str) -> None:
        server.add_insecure_port(_on_loopback(address))

    module.add_grpc_address = add_grpc_address


def _patch_replica(module) -> None:
    """Every Serve replica opens an internal gRPC server on `[::]:0` (`replica.add_port_to_grpc_server`)."""
    add_port = module.add_port_to_grpc_server

    def add_port_to_grpc_server(server, address: str):
        return add_port(server, _on_loopback(address))

    module.add_port_to_grpc_server = add_port_to_grpc_server


_PATCHES = {"ray.serve._private.default_impl": _patch_proxy, "ray.serve._private.replica": _patch_replica}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        patch = _PATCHES.get(name)
        if patch is None or getattr(self, "_busy", False):
            return None
        self._busy = True  # find_spec below asks the finders again, this one included
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        run_module = spec.loader.exec_module

        def exec_module(module) -> None:
            run_module(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def serve_on_loopback() -> None:
    """Worker setup hook: on a loopback node, Serve's gRPC proxy will listen on the node's address only."""
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
