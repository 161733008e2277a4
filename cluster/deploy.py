"""Deploying ringpipe onto a running Ray cluster, and the same deployment as a Serve config.

`deploy(cfg, address)` joins the cluster (`--address`, else RAY_ADDRESS, else the
one running on this machine, `cluster.local.find_cluster`; Ray reads
RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH from the environment), starts the controller
(detached: it starts and watches the pipeline replicas) and the coordinator app
behind Serve's proxies, waits until gRPC answers SERVING and returns, leaving
everything running after the caller exits; `undeploy(address)` removes both.

`serve_config(cfg, path)` is the same deployment as a Serve config file, what
`serve deploy` and `serve run` take. Its application is built by `app`, which
starts the controller the same way, so either route gives the same service.
"""

from __future__ import annotations

from pathlib import Path

from cluster.config import ConfigError, RingpipeConfig, load_config
from cluster.errors import NoService
from cluster.local import check_ray, find_cluster, init_ray
from cluster.serve import (
    controller_settings,
    coordinator_settings,
    ensure_model,
    run_app,
    running_controller,
    start_controller,
    stop_controller,
)
from coordinator.app import APP_NAME, SERVICER_FUNCTIONS, build_app

APP_BUILDER = "cluster.deploy:app"


class DeployError(Exception):
    """The cluster is not in a state to deploy to (or undeploy from); the message says what to do."""


def app(args: dict):
    """Serve's application builder: `import_path: cluster.deploy:app`, `args: {config: FILE}`.

    FILE is a ringpipe service config, readable on the node that builds the app."""
    check_ray()
    if not isinstance(args, dict) or "config" not in args:
        raise ConfigError("the Serve application's args need `config`: the path of a ringpipe service config")
    cfg = load_config(args["config"])
    settings = coordinator_settings(cfg)
    start_controller(cfg)
    return build_app(settings, cfg.server.coordinators, cfg.server.max_ongoing_requests)


def serve_config(cfg: RingpipeConfig, config_path: str | Path) -> dict:
    """The Serve config (ServeDeploySchema) that deploys the service of `cfg`, read from `config_path`."""
    server = cfg.server
    grpc_options: dict = {"port": server.port, "grpc_servicer_functions": list(SERVICER_FUNCTIONS)}
    http_options: dict = {"host": "0.0.0.0" if server.host == "auto" else server.host, "port": server.http_port}
    if server.request_timeout_s is not None:  # HTTP's deadline is the coordinator's own (504 in OpenAI's shape)
        grpc_options["request_timeout_s"] = server.request_timeout_s
    return {
        "proxy_location": server.proxy_location,
        "http_options": http_options,
        "grpc_options": grpc_options,
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": APP_BUILDER,
                "args": {"config": str(Path(config_path).resolve())},
            }
        ],
    }


def _controller(address: str):
    try:
        return running_controller(address)
    except NoService:
        return None


def deploy(cfg: RingpipeConfig, address: str | None = None, progress: bool = True,
           ready_timeout_s: float = 300.0) -> str:
    """Deploy onto the cluster at `address` (else RAY_ADDRESS, else the one running on this machine);
    returns the gRPC target once it serves."""
    address = find_cluster(address)
    coordinator_settings(cfg)  # reads the auth tokens: fail before starting anything
    controller_settings(cfg)
    ensure_model(cfg, progress)
    init_ray(address)
    if _controller(address) is not None:
        raise DeployError(f"ringpipe is already deployed on the Ray cluster at {address}: `ringpipe undeploy` first")
    try:
        start_controller(cfg)
        return run_app(cfg, "joined", ready_timeout_s)
    except BaseException:
        undeploy(address)
        raise


def undeploy(address: str | None = None) -> list[str]:
    """Remove the coordinator app (and Serve, when no other app is left) and the replicas from the cluster
    at `address` (else RAY_ADDRESS, else the one running on this machine); what was removed."""
    import ray
    from ray import serve

    address = find_cluster(address)
    init_ray(address)
    removed = []
    try:
        applications = serve.status().applications
    except ConnectionError:
        applications = {}  # Serve is not running here
    if APP_NAME in applications:
        serve.delete(APP_NAME)
        removed.append(f"Serve application {APP_NAME}")
        if len(applications) == 1:
            serve.shutdown()
            removed.append("Serve")
    controller = _controller(address)
    if controller is not None:
        stop_controller(controller)
        removed.append("controller and pipeline replicas")
    ray.shutdown()
    return removed


def cmd_deploy(args) -> int:
    import time

    from cluster.cli import _fail, _spinner

    cfg = load_config(args.config)
    started = time.monotonic()
    try:
        with _spinner("starting replicas and coordinators"):
            target = deploy(cfg, args.address, ready_timeout_s=args.timeout)
    except DeployError as exc:
        return _fail(str(exc))
    print(f"ringpipe deployed: {cfg.replicas.count} replicas x {cfg.pipeline.stages} stages "
          f"(+{cfg.replicas.standby} standby); gRPC on {target}; ready in {time.monotonic() - started:.0f}s",
          flush=True)
    return 0


def cmd_undeploy(args) -> int:
    address = find_cluster(args.address)
    removed = undeploy(address)
    print("removed: " + ", ".join(removed) if removed else f"nothing of ringpipe was running on the Ray cluster at {address}")
    return 0


def cmd_serve_config(args) -> int:
    import yaml

    cfg = load_config(args.config)
    text = yaml.safe_dump(serve_config(cfg, args.cluster_path or args.config), sort_keys=False)
    header = f"# Serve config of the ringpipe service in {args.config}: serve deploy FILE / serve run FILE\n"
    if args.output:
        args.output.write_text(header + text)
    else:
        print(header + text, end="")
    return 0

