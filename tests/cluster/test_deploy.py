"""`ringpipe deploy` / `undeploy` and the Serve config, as an operator runs them against a Ray cluster
they started themselves (`ray start --head`, its own processes on 127.0.0.1, stopped by PID)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid

import psutil
import pytest
import yaml

from coordinator.client import Client
from tests.conftest import free_port
from tests.reference import hf_greedy, starting_nodes, stop_started, wait_for

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "cluster.cli"]


AUTH: dict[str, str] = {}  # Ray's token auth, on by default for `ray start`: every client needs the token


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster of its own, started the way an operator starts one; yields its address."""
    port = free_port()
    directory = tmp_path_factory.mktemp("ray-head")
    (directory / "auth_token").write_text(uuid.uuid4().hex)
    AUTH.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(directory / "auth_token"))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", **AUTH}
    env.pop("RAY_ADDRESS", None)
    log = open(directory / "ray.log", "w+")  # noqa: SIM115
    nodes_lock = contextlib.ExitStack()  # held until the node is up
    nodes_lock.enter_context(starting_nodes())
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port", str(port),
         "--node-ip-address", "127.0.0.1", "--num-cpus", "4", "--include-dashboard", "false",
         "--disable-usage-stats", "--object-store-memory", str(200 << 20),
         "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
         "--metrics-export-port", str(free_port())],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert head.poll() is None, open(log.name).read()[-3000:]
            return "Ray runtime started" in open(log.name).read()

        wait_for(up, 60, "ray start --head")
        nodes_lock.close()
        yield address
    finally:
        nodes_lock.close()
        started = [p.pid for p in psutil.Process(head.pid).children(recursive=True)] if head.poll() is None else []
        stop_started(head, started, signal.SIGTERM, 60)  # `ray start --block` stops what it started


def service_config(tmp_path, checkpoint, token: str | None = None) -> tuple:
    """A service config (`token`: the bearer token clients must send) and its gRPC target."""
    port, http_port = free_port(), free_port()
    path = tmp_path / "service.yaml"
    server = {"port": port, "http_port": http_port, "coordinators": 1, "host": "127.0.0.1"}
    if token:
        (tmp_path / "token").write_text(token)
        server["auth"] = {"token_file": str(tmp_path / "token")}
    path.write_text(yaml.safe_dump({
        "model": {"path": str(checkpoint)},
        "pipeline": {"stages": 2, "max_batch": 4, "max_seq_len": 128, "cpus_per_stage": 0.5},
        "replicas": {"count": 1},
        "server": server,
    }))
    return path, f"127.0.0.1:{port}"


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **AUTH}
    full.pop("RAY_ADDRESS", None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env={**full, **(env or {})}, timeout=400)


def listeners(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port}


def test_deploy_then_undeploy_with_ringpipe(ray_head, make_checkpoint, tmp_path):
    checkpoint = make_checkpoint("llama", vocab=512, layers=4, hidden=64)
    config, target = service_config(tmp_path, checkpoint, token="s3cret")
    done = cli("deploy", "--config", str(config), "--address", ray_head)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"gRPC on {target}" in done.stdout
    try:
        with Client(target, token="s3cret") as client:
            assert client.generate([5, 17, 99, 3], 6).token_ids == hf_greedy(checkpoint, (5, 17, 99, 3), 6)
        assert listeners(int(target.rsplit(":", 1)[1])) <= {"127.0.0.1", "::ffff:127.0.0.1"}
        # a wrong or missing bearer token: one line that says where the token goes
        for token, hint in (("wrong", "put the server's token in RINGPIPE_TOKEN)"), ("", "which is unset)")):
            denied = cli("generate", "--prompt-ids", "5,17", "--max-new-tokens", "2", "--target", target,
                         env={"RINGPIPE_TOKEN": token})
            assert denied.returncode == 1 and denied.stderr.startswith("ringpipe: UNAUTHENTICATED: "), denied.stderr
            assert hint in denied.stderr and len(denied.stderr.strip().splitlines()) == 1
        again = cli("deploy", "--config", str(config), env={"RAY_ADDRESS": ray_head})
        assert again.returncode == 2 and "already deployed" in again.stderr
    finally:
        gone = cli("undeploy", "--address", ray_head)
    assert gone.returncode == 0, gone.stderr[-3000:]
    assert "controller and pipeline replicas" in gone.stdout and "Serve application ringpipe" in gone.stdout
    wait_for(lambda: not listeners(int(target.rsplit(":", 1)[1])), 30, "the gRPC port to close")
    assert "nothing of ringpipe" in cli("undeploy", "--address", ray_head).stdout


def test_serve_config_deploys_the_same_service(ray_head, make_checkpoint, tmp_path):
    """The generated Serve config passes Serve's own schema, and what it names builds the service."""
    from ray.serve.schema import ServeDeploySchema

    checkpoint = make_checkpoint("llama", vocab=512, layers=4, hidden=64)
    config, target = service_config(tmp_path, checkpoint)
    out = cli("serve-config", "--config", str(config), "-o", str(tmp_path / "serve.yaml"))
    assert out.returncode == 0, out.stderr
    schema = ServeDeploySchema.model_validate(yaml.safe_load((tmp_path / "serve.yaml").read_text()))
    (application,) = schema.applications
    assert schema.grpc_options.port == int(target.rsplit(":", 1)[1])
    # what `serve run serve.yaml` does, in a driver with ringpipe's loopback hook (Serve's gRPC proxy
    # would otherwise listen on every interface)
    driver = f"""
import sys, yaml
from ray import serve
from ray._common.utils import import_attr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema
from cluster.local import init_ray
init_ray({ray_head!r})
schema = ServeDeploySchema.model_validate(yaml.safe_load(open({str(tmp_path / "serve.yaml")!r})))
grpc = schema.grpc_options.model_dump()
serve.start(proxy_location=schema.proxy_location, http_options=schema.http_options.model_dump(),
            grpc_options={{k: grpc[k] for k in ("port", "grpc_servicer_functions", "request_timeout_s")}})
(a,) = schema.applications
serve.run(call_user_app_builder_with_args_if_necessary(import_attr(a.import_path), a.args),
          name=a.name, route_prefix=a.route_prefix)
"""
    try:
        run = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=400,
                             env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **AUTH})
        assert run.returncode == 0, run.stderr[-3000:]
        with Client(target) as client:
            assert client.generate([7, 8, 9], 5).token_ids == hf_greedy(checkpoint, (7, 8, 9), 5)
    finally:
        gone = cli("undeploy", "--address", ray_head)
    assert "controller and pipeline replicas" in gone.stdout, gone.stderr[-3000:]
