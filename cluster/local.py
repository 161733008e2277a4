"""Joining a Ray cluster, or starting the embedded local one on loopback.

Ray rewrites 127.0.0.1 to the machine's outward address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before Ray is imported; the local
mode sets it, so an embedded cluster listens on 127.0.0.1 only.

Serve's gRPC proxy has no host option: it binds `[::]:port`, every interface.
The local mode (and `ringpipe deploy`) therefore gives its job a worker setup
hook (`serve_on_loopback`) that, on a node whose address is a loopback one
(127.0.0.1 here, 127.0.0.2… for the nodes of a test cluster from `ray up`) or
one of a cluster with nodes in namespaces (10.231.K.x, `cluster/netns.py`),
rewrites that address to the node's own in the proxy's process, through the
function Serve names as its extension point for it (`default_impl.add_grpc_address`).
Every Serve replica also opens an internal gRPC server on `[::]:0`; the same
hook moves it to the node's address (`replica.add_port_to_grpc_server`).
The hook runs in every worker of the job, so it only arms an import hook: the
patch happens if and when a worker imports that module (the proxy does).
These are the only patches of Ray's private modules, and they stay because Ray
has no public option for either address: checked against Ray 2.60.0, whose
`gRPCOptions` has `port`, `grpc_servicer_functions`, `request_timeout_s` and
`enable_reflection` but no host (`grpc_util.start_grpc_server` binds
`[::]:port`), whose replica binds `[::]:0` unconditionally
(`Replica._on_initialized`), and whose only host setting, `http_options.host`
(or RAY_SERVE_DEFAULT_HTTP_HOST), applies to the HTTP proxy alone. `check_ray`
refuses any other Ray minor version, so a Ray whose internals moved is never
patched blindly; `_patched` fails loudly if a patched function is gone.

Commands that need a running cluster (`deploy`, `undeploy`, `chaos`) find it
as Ray's own tools do when given no address (`find_cluster`): the raylets on
this machine name their cluster's GCS address on their command lines; one
cluster is joined, none or several is one line saying what to pass.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import importlib.util
import os
import re
import sys

LOOPBACK = "127.0.0.1"
# The Ray versions ringpipe runs on: what the suite is run against, and pyproject.toml's range
# (`ray[serve]>=2.60,<2.61`). Relied upon: Ray's token auth (RAY_AUTH_MODE=token), bundle
# label selectors of placement groups (shards/replica.py), Serve's gRPC proxy internals patched
# below, and the raylet command line `find_cluster` reads.
RAY_TESTED = (2, 60)
RAY_REQUIREMENT = "ray[serve]>=2.60,<2.61"
# the job's runtime env: every worker runs `serve_on_loopback` first (ringpipe is installed on every node)
LOOPBACK_HOOK = {"worker_process_setup_hook": "cluster.local.serve_on_loopback"}


def prepare_local(address: str | None = None) -> None:
    """Before Ray is first imported: keep a local cluster, or one joined on a loopback address (or a
    namespaced cluster's bridge, `cluster/netns.py`), on loopback (Ray reads this at import; else it
    rewrites 127.0.0.1 to the machine's outward address)."""
    from cluster.netns import is_netns_address

    address = address or os.environ.get("RAY_ADDRESS")
    host = (address or "").removeprefix("ray://").rsplit(":", 1)[0]
    if not address or host.startswith("127.") or host == "localhost" or is_netns_address(host):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class UnsupportedRay(Exception):
    """The installed Ray is outside the range ringpipe is tested on."""


def ray_unsupported(version: str | None) -> str | None:
    """Why Ray `version` (None: not installed) cannot run ringpipe, in one line; None when it can."""
    install = f"pip install '{RAY_REQUIREMENT}'"
    if version is None:
        return f"Ray is not installed in this Python ({sys.executable}): {install}"
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and (int(match[1]), int(match[2])) == RAY_TESTED:
        return None
    tested = ".".join(map(str, RAY_TESTED))
    return f"ringpipe runs on Ray {tested}.x ({RAY_REQUIREMENT}), this Python has Ray {version}: {install}"


def check_ray() -> None:
    """Raise UnsupportedRay unless the installed Ray is one ringpipe is tested on (Ray is not imported)."""
    try:
        version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        version = None
    why = ray_unsupported(version)
    if why:
        raise UnsupportedRay(why)


class NoRayCluster(Exception):
    """No Ray cluster to join: nothing answers at the address given (Ray itself would retry for
    minutes), or none (or several) run on this machine when no address was given."""


class RayAuthFailed(Exception):
    """The Ray cluster refused this process's Ray auth token (or its lack of one)."""

    def __init__(self, address: str) -> None:
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            what = ("put the token it was started with in RAY_AUTH_TOKEN, or its file in RAY_AUTH_TOKEN_PATH "
                    "(default ~/.ray/auth_token)")
        else:
            what = ("set RAY_AUTH_MODE=token (Ray then reads the token from ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH "
                    "or RAY_AUTH_TOKEN; a cluster `ringpipe serve` starts without --nodes uses ~/.ray/auth_token)")
        super().__init__(f"the Ray cluster at {address} wants Ray's auth token: {what}")


def running_clusters() -> set[str]:
    """The GCS addresses of the Ray clusters with a raylet on this machine.

    Read from the raylets' command lines (`--gcs-address=`), as Ray's own tools find a local
    cluster (`ray status`, `ray.init(address="auto")`: `ray._private.services.find_gcs_addresses`,
    Ray 2.60), without importing Ray: it must not be imported before `prepare_local`. Ray's other
    hint, the file `ray_current_cluster` in its temp dir, is not used: it names the cluster started
    last by anyone on the machine, and the last one stopped deletes it."""
    import psutil

    found = set()
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"]  # None where access is denied
        if not cmdline or "raylet" not in os.path.basename(cmdline[0]):
            continue
        for arg in " ".join(cmdline).split():  # a retitled process may hold its arguments in one string
            if arg.startswith("--gcs-address=") and arg.split("=", 1)[1] not in ("", "None"):
                found.add(arg.split("=", 1)[1])
    return found


def choose_cluster(running: set[str]) -> str:
    """The one cluster in `running`; else NoRayCluster saying what to pass."""
    if len(running) == 1:
        return next(iter(running))
    if not running:
        raise NoRayCluster("no Ray cluster runs on this machine: start one (`ringpipe serve`, `ray start --head`), "
                           "or pass the address of one with --address (or RAY_ADDRESS)")
    raise NoRayCluster(f"{len(running)} Ray clusters run on this machine ({', '.join(sorted(running))}): pass the "
                       "one to use with --address (or RAY_ADDRESS; `ringpipe serve` prints its address)")


def find_cluster(address: str | None = None) -> str:
    """The address of the Ray cluster a command that needs a running one joins: `address`
    (--address), else RAY_ADDRESS, else the one cluster running on this machine. "auto" is passed on:
    Ray's own choice (the cluster `ray start` started last here; the cluster configs deploy with it)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return address
    return choose_cluster(running_clusters())


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


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True,
             metrics_port: int | None = None) -> str:
    """Connect to `address` (or RAY_ADDRESS) when given, else start a local Ray on 127.0.0.1
    (its Prometheus metrics on `metrics_port`, if given and not 0).

    Returns "joined" or "local"; a Ray already initialised in this process is reused.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    check_ray()
    prepare_local(address)
    import ray

    if ray.is_initialized():
        return "joined"
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=not quiet, runtime_env=LOOPBACK_HOOK)
        except ConnectionError as exc:
            # Ray 2.60 raises ConnectionError from a RuntimeError that quotes the AuthenticationError
            cause = exc.__cause__
            if isinstance(cause, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(cause):
                raise RayAuthFailed(address) from None
            raise
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
        _metrics_export_port=metrics_port or None,
    )
    return "local"


# How the GCS checks the nodes of a local multi-node cluster (every node a process on this machine):
# each second, and dead after 3 checks in a row failed, where Ray's defaults (every 3 s, 5 failures)
# take 15 s to find a killed node dead; a pipeline on it is rebuilt elsewhere only then
# (`Replica.place`). A killed raylet refuses the check at once; a stopped or starved one still has
# Ray's 10 s per check (`health_check_timeout_ms`, unchanged) to answer. Not for nodes in network
# namespaces (`NetnsCluster`): a node whose link is cut times out instead, and Ray's own pace decides
# there how long a partition it rides out.
LOCAL_HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def start_local_cluster(nodes: int, cpus_per_node: int | None = None, quiet: bool = True, netns: bool = False,
                        metrics_port: int | None = None):
    """A head and `nodes` worker nodes, each a real raylet on 127.0.0.1, and this process connected.

    The head gets no CPUs, so stages are placed on the worker nodes (and killing one is
    a real node failure); the controller, Serve and the coordinators need none and stay
    wherever Ray puts them. Returns the `ray.cluster_utils.Cluster`; `shutdown()` it after
    `ray.shutdown()`. `netns`: each worker node in a network namespace of its own instead
    (`NetnsCluster`: root only), so that its link can be cut. `metrics_port` (not 0, not netns): the
    head's Prometheus metrics port, worker node i's the port i + 1 up; else Ray picks them.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be ≥ 1, got {nodes}")
    check_ray()
    prepare_local()
    if netns:
        return NetnsCluster(nodes, cpus_per_node, quiet)
    import ray
    from ray.cluster_utils import Cluster

    cpus = cpus_per_node or max(os.cpu_count() or 1, 6)
    node_args = {"node_ip_address": LOOPBACK, "object_store_memory": 256 << 20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node_args, "num_cpus": 0, "include_dashboard": False,
                        "metrics_export_port": metrics_port or None, "_system_config": LOCAL_HEALTH_CHECK},
    )
    try:
        for i in range(nodes):
            port = metrics_port + 1 + i if metrics_port else None
            cluster.add_node(**node_args, num_cpus=cpus, metrics_export_port=port)
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


class NetnsCluster:
    """A head on a bridge of its own (`cluster/netns.py`) and worker nodes each in its own network
    namespace, every node a `cluster.local_node` process started there; this process connected.

    `shutdown()` (after `ray.shutdown()`) stops the nodes, the head, and removes the namespaces and
    the bridge, whatever else was started in them meanwhile (a node `ringpipe chaos` restarted)."""

    NODE_TIMEOUT_S = 120.0  # for one node to join
    NODE_TRIES = 3  # a node whose raylet did not register in Ray's time (a loaded machine) is started again

    def __init__(self, nodes: int, cpus_per_node: int | None = None, quiet: bool = True) -> None:
        import ray
        from ray.cluster_utils import Cluster

        from cluster import netns

        why = netns.unavailable()
        if why:
            raise netns.NetnsError(f"--netns: {why}")
        self.bridge = netns.Bridge()
        self.nets: list = []
        self.processes: list = []
        self.head = None
        try:
            self.head = Cluster(initialize_head=True, head_node_args={
                "node_ip_address": self.bridge.address, "object_store_memory": 256 << 20,
                "num_cpus": 0, "include_dashboard": False,
            })
            self.address = self.head.address
            self.logs = os.path.join(self.head.head_node.get_session_dir_path(), "logs")
            cpus = cpus_per_node or max(os.cpu_count() or 1, 6)
            for i in range(nodes):  # one at a time, as `ray.cluster_utils` adds them: raylets starting
                net = netns.NodeNet(self.bridge.cluster, i)  # together on a small machine time out
                self.nets.append(net)
                net.create(self.bridge.name)
                self._start_node(net, {"ip": net.address, "num_cpus": cpus, "object_store_memory": 256 << 20})
            ray.init(address=self.address, log_to_driver=not quiet, configure_logging=not quiet,
                     runtime_env=LOOPBACK_HOOK)
        except BaseException:
            if ray.is_initialized():
                ray.shutdown()
            self.shutdown()
            raise

    def _start_node(self, net, spec: dict) -> None:
        """Start `cluster.local_node` in `net`'s namespace; return once it says it joined."""
        import json
        import subprocess
        import time

        path = os.path.join(self.logs, f"netns-node-{net.index}.out")
        argv = net.command([sys.executable, "-m", "cluster.local_node", self.address, json.dumps(spec)])
        for _ in range(self.NODE_TRIES):
            with open(path, "ab") as log:
                start = log.tell()
                process = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT)
            self.processes.append(process)
            deadline = time.monotonic() + self.NODE_TIMEOUT_S
            while process.poll() is None and time.monotonic() < deadline:
                with open(path, "rb") as log:
                    log.seek(start)
                    if b" joined " in log.read():
                        return
                time.sleep(0.2)
            if process.poll() is None:
                process.kill()
        raise RuntimeError(f"the worker node in namespace {net.namespace} did not join {self.address} in "
                           f"{self.NODE_TRIES} tries: see {path}")

    def shutdown(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except Exception:  # noqa: BLE001 — a node that does not stop is killed with its namespace
                pass
        try:
            if self.head is not None:
                self.head.shutdown()
        finally:
            for net in self.nets:
                net.delete()
            self.bridge.delete()


def _on_loopback(address: str) -> str:
    """`[::]:port` (every interface) as the node's own address, on a node whose address is a loopback
    one or a namespaced cluster's."""
    import ray

    from cluster.netns import is_netns_address

    node_ip = ray.util.get_node_ip_address() if ray.is_initialized() else LOOPBACK
    return address.replace("[::]", node_ip, 1) if node_ip.startswith("127.") or is_netns_address(node_ip) else address


def _patched(module, name: str):
    """`module.name`, the function a patch replaces; an error naming both if this Ray has none."""
    try:
        return getattr(module, name)
    except AttributeError:
        raise RuntimeError(f"ringpipe's loopback patch needs {module.__name__}.{name}, which this Ray has not "
                           f"(checked on Ray {'.'.join(map(str, RAY_TESTED))}): {RAY_REQUIREMENT}") from None


def _patch_proxy(module) -> None:
    """Serve's gRPC proxy binds through `default_impl.add_grpc_address` (Ray 2.60.0: `[::]:port`, and
    `gRPCOptions` has no host): the function Serve itself replaces per platform."""
    _patched(module, "add_grpc_address")

    def add_grpc_address(server, address: str) -> None:
        server.add_insecure_port(_on_loopback(address))

    module.add_grpc_address = add_grpc_address


def _patch_replica(module) -> None:
    """Every Serve replica opens an internal gRPC server on `[::]:0` (`replica.add_port_to_grpc_server`;
    Ray 2.60.0: no option or environment variable moves it)."""
    add_port = _patched(module, "add_port_to_grpc_server")

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
