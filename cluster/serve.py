"""Starting and stopping the whole service: replicas, coordinators, Serve's gRPC proxy.

`start_service(cfg)` joins the Ray cluster (RAY_ADDRESS / `address`) or starts
the embedded local one on 127.0.0.1, builds the demo model when the config asks
for it, has the controller start the pipeline replicas, then deploys the
coordinator behind Serve's gRPC proxy and waits until the proxy answers a health
check. `Service.shutdown()` undoes all of it, in reverse.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.config import ConfigError, RingpipeConfig, auth_token
from cluster.errors import NoService, NotServing, PortTaken
from cluster.local import LOOPBACK, init_ray, start_local_cluster
from coordinator.app import APP_NAME, SERVICER_FUNCTIONS, build_app
from coordinator.service import CoordinatorSettings, Takeover
from failover.controller import CONTROLLER_NAME, NAMESPACE, Controller, ControllerSettings
from failover.heartbeat import HeartbeatSettings
from failover.slow import SlowSettings

HEAD_RESOURCE = "node:__internal_head__"  # Ray gives it to the head node only


@dataclass
class Service:
    cfg: RingpipeConfig
    mode: str  # "local" or "joined"
    target: str  # host:port of the gRPC endpoint
    controller: object
    owns_ray: bool
    local_cluster: object | None = None  # ray.cluster_utils.Cluster of `--nodes`

    @property
    def openai_base_url(self) -> str:
        """The OpenAI API's base URL, on Serve's HTTP proxy (the same host as gRPC)."""
        return f"http://{self.target.rsplit(':', 1)[0]}:{self.cfg.server.http_port}/v1"

    @property
    def ray_address(self) -> str:
        """The GCS address of the cluster it runs on (what `--address` / RAY_ADDRESS take)."""
        import ray

        return ray.get_runtime_context().gcs_address

    @property
    def metrics_urls(self) -> list[str]:
        """Each live node's Prometheus endpoint (Ray's metrics export), the head's first, then by address
        and port: ringpipe's metrics are exported by the node of the process that records them."""
        import ray

        nodes = sorted((HEAD_RESOURCE not in n["Resources"], n["NodeManagerAddress"], n["MetricsExportPort"])
                       for n in ray.nodes() if n["Alive"])
        return [f"http://{address}:{port}/metrics" for _, address, port in nodes]

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            if serve.status().applications:  # nothing to delete when start failed before Serve ran
                serve.delete(APP_NAME)
            serve.shutdown()
        finally:
            try:
                if self.controller is not None:
                    stop_controller(self.controller)
            finally:
                if self.owns_ray:
                    ray.shutdown()
                if self.local_cluster is not None:
                    self.local_cluster.shutdown()


def stop_controller(controller) -> None:
    """Shut down every replica the controller started, then the controller itself."""
    import ray

    try:
        ray.get(controller.shutdown.remote(), timeout=60)
    finally:
        ray.kill(controller, no_restart=True)


def coordinator_settings(cfg: RingpipeConfig) -> CoordinatorSettings:
    return CoordinatorSettings(
        model_dir=cfg.model.directory,
        max_seq_len=cfg.pipeline.max_seq_len,
        max_new_tokens=cfg.server.max_new_tokens or cfg.pipeline.max_seq_len,
        max_request_bytes=cfg.server.max_request_bytes,
        routing_key=cfg.routing.key,
        prefix_tokens=cfg.routing.prefix_tokens,
        load_factor=cfg.routing.load_factor,
        vnodes=cfg.routing.vnodes,
        auth_token=auth_token(cfg),
        max_health_watches=min(cfg.server.max_health_watches, cfg.server.max_ongoing_requests - 1),
        dtype=cfg.model.dtype,
        model_name=cfg.model.served_name,
        request_timeout_s=cfg.server.request_timeout_s,
        takeover=Takeover(
            max_retries=cfg.failover.takeover.max_retries,
            retry_interval_s=cfg.failover.takeover.retry_interval_s,
            max_resume_tokens=cfg.failover.takeover.max_resume_tokens,
            wait_s=cfg.failover.takeover.wait_s,
        ),
    )


def controller_settings(cfg: RingpipeConfig) -> ControllerSettings:
    hb, registry = cfg.failover.heartbeat, cfg.failover.registry
    consul = None
    if registry.backend == "consul":
        from failover.consul import ConsulSettings

        c = registry.consul
        token = None
        if c.token_env:
            token = os.environ.get(c.token_env) or None
            if token is None:
                raise ConfigError(f"config key 'failover.registry.consul.token_env': {c.token_env} is empty or unset")
        consul = ConsulSettings(address=c.address, scheme=c.scheme, token=token, service=c.service, ttl_s=c.ttl_s,
                                key=c.key)
    return ControllerSettings(
        replicas=cfg.replicas.count,
        standby=cfg.replicas.standby,
        heartbeat=HeartbeatSettings(interval_s=hb.interval_s, timeout_s=hb.timeout_s),
        slow=SlowSettings(
            threshold_s=hb.slow.threshold_ms / 1000,
            count=hb.slow.count,
            pause_s=hb.slow.pause_s,
            max_paused_fraction=hb.slow.max_paused_fraction,
            peer_factor=hb.slow.peer_factor,
        ),
        adaptive=cfg.failover.adaptive.adaptive_settings(),
        consul=consul,
    )


def ensure_model(cfg: RingpipeConfig, progress: bool = True) -> str:
    """The checkpoint directory, with the demo model trained into it first if the config asks."""
    if cfg.model.demo:
        from cluster.demo import build_demo

        build_demo(cfg.model.directory, progress=progress)
    return cfg.model.directory


def running_controller(address: str):
    """The controller of the ringpipe service on the cluster this process joined (at `address`);
    NoService when there is none."""
    import ray

    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:  # what Ray raises for an actor name nobody holds
        raise NoService(f"no ringpipe service runs in the Ray cluster at {address}: start one (`ringpipe serve`, "
                        "`ringpipe deploy --config FILE`), or pass the --address of the cluster that runs it (the "
                        "one `ringpipe serve` printed)") from None


def check_ports_free(cfg: RingpipeConfig, host: str = LOOPBACK) -> None:
    """PortTaken unless Serve's gRPC and HTTP ports can be bound on `host`, the address this machine's
    proxy will listen on: checked before anything starts (Serve would retry the proxy forever)."""
    import socket

    for port, setting in ((cfg.server.port, "server.port, or --port"), (cfg.server.http_port, "server.http_port")):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxies do: TIME_WAIT is no conflict
            try:
                s.bind((host, port))
            except OSError as exc:
                raise PortTaken(f"port {port} on {host} is in use ({exc.strerror}): stop what listens there, or "
                                f"set another port ({setting})") from None


def start_controller(cfg: RingpipeConfig):
    """The controller of this cluster, started (it starts the replicas) unless it already runs.

    Detached and on the head node (where the GCS lives: the last node to go), whichever node that
    is; a soft affinity to it is not kept when the head has no CPUs (the local multi-node cluster).
    """
    import ray

    controller = Controller.options(
        name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        resources={HEAD_RESOURCE: 0.001},
    ).remote(cfg.replica_spec(), controller_settings(cfg))
    ray.get(controller.start.remote())
    return controller


def listen_host(cfg: RingpipeConfig, mode: str) -> str:
    """Where the proxies listen: `server.host`, or with `auto` loopback on loopback clusters, else everywhere."""
    import ray

    if cfg.server.host != "auto":
        return cfg.server.host
    node_ip = ray.util.get_node_ip_address()
    if mode == "local":  # 127.0.0.1, or the bridge of a cluster with nodes in namespaces
        return node_ip
    return node_ip if node_ip.startswith("127.") else "0.0.0.0"


def serve_options(cfg: RingpipeConfig, host: str, mode: str = "joined") -> dict:
    """The keyword arguments of `serve.start` for this config (the same keys as a Serve config file)."""
    from ray.serve.config import gRPCOptions

    return {
        # local mode: one proxy, on the head; local nodes share one address, so per-node proxies would clash
        "proxy_location": "HeadOnly" if mode == "local" else cfg.server.proxy_location,
        "http_options": {"host": host, "port": cfg.server.http_port},
        "grpc_options": gRPCOptions(
            port=cfg.server.port,
            grpc_servicer_functions=SERVICER_FUNCTIONS,
            request_timeout_s=cfg.server.request_timeout_s,
        ),
    }


def run_app(cfg: RingpipeConfig, mode: str, ready_timeout_s: float, on_head: bool = False) -> str:
    """Start Serve's proxies and the coordinator app; returns the gRPC target once it answers SERVING.
    `on_head`: the coordinators on the head node (beside the proxy), never on a worker node."""
    import ray
    from ray import serve

    host = listen_host(cfg, mode)
    serve.start(**serve_options(cfg, host, mode))
    app = build_app(coordinator_settings(cfg), cfg.server.coordinators, cfg.server.max_ongoing_requests,
                    resources={HEAD_RESOURCE: 0.001} if on_head else None)
    serve.run(app, name=APP_NAME, route_prefix="/")
    target = f"{ray.util.get_node_ip_address() if host == '0.0.0.0' else host}:{cfg.server.port}"
    wait_serving(target, ready_timeout_s)
    return target


def start_service(
    cfg: RingpipeConfig,
    address: str | None = None,
    progress: bool = True,
    ready_timeout_s: float = 120.0,
    nodes: int | None = None,
    netns: bool = False,
) -> Service:
    """Start everything; `nodes`: first start a local cluster of a head and that many worker nodes
    (`netns`: each in a network namespace of its own, see `cluster/netns.py`; the coordinators then
    stay on the head, so that cutting a node's link partitions stages, not the front)."""
    coordinator_settings(cfg)  # reads the auth tokens: fail before starting anything
    controller_settings(cfg)
    import ray

    owns_ray = not ray.is_initialized()
    metrics_port = 0 if netns else cfg.server.metrics_port  # (namespaced nodes: the ports Ray picks)
    if nodes or (owns_ray and not (address or os.environ.get("RAY_ADDRESS"))):  # a local cluster: check first
        check_metrics_ports(metrics_port, 1 + (nodes or 0))
    ensure_model(cfg, progress)
    local_cluster = None
    if nodes:
        local_cluster = start_local_cluster(nodes, netns=netns, metrics_port=metrics_port)
        mode = "local"
    else:
        mode = init_ray(address, metrics_port=metrics_port)
    controller = None
    try:
        controller = start_controller(cfg)
        target = run_app(cfg, mode, ready_timeout_s, on_head=netns)
    except BaseException:
        Service(cfg, mode, "", controller, owns_ray, local_cluster).shutdown()
        raise
    return Service(cfg, mode, target, controller, owns_ray, local_cluster)


def check_metrics_ports(port: int, count: int) -> None:
    """A ConfigError naming `server.metrics_port` when one of the `count` ports from `port` (a local
    cluster's nodes) is taken on loopback. (Ray's node would not start: its raylet times out after 30 s
    without a word about the port.)"""
    for p in range(port, port + count) if port else ():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent's HTTP server binds
            try:
                s.bind((LOOPBACK, p))
            except OSError as exc:
                nodes = f"the local cluster's {count} nodes take ports {port}-{port + count - 1}; " if count > 1 else ""
                raise ConfigError(
                    f"config key 'server.metrics_port': port {p} on {LOOPBACK} is taken ({exc.strerror}); "
                    f"{nodes}choose free ones (--metrics-port), or 0 for ports Ray picks"
                ) from None


def wait_serving(target: str, timeout_s: float) -> None:
    """Block until the gRPC health check at `target` answers SERVING."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise NotServing(f"the gRPC endpoint {target} did not report SERVING within {timeout_s:.0f}s: is "
                                 "its port (server.port) taken on the proxy's node, or are the replicas still "
                                 "loading? `serve status` and Serve's proxy log tell")
            time.sleep(0.25)
