"""`ray up` for real: configs/cluster-local.yaml brings up a 3-node Ray cluster over SSH on this one
machine, its head deploys ringpipe, the service answers what transformers computes, `ringpipe chaos`
joined to it with the cluster's token pauses a node and kills a stage and the coordinator under load
without losing anything, and `ray down` leaves nothing running.

The "hosts" 127.0.0.2 (head), 127.0.0.3 and 127.0.0.4 (workers) are served by an sshd of the test's
own, and the cluster runs as a user made for the test (tests/cluster/sshd.py), so `ray down` (whose
`ray stop` stops every Ray process of its user on the machine) touches the test cluster only.

The test copy of the template changes only what SSH, and three nodes sharing one machine, need
(`cluster_config` below), and why:
- Ray's gRPC servers bind 127.0.0.1 when the node's address is 127.0.0.1, and every interface for
  any other address (127.0.0.2 included). So every Ray node says 127.0.0.1 (the SSH hosts stay
  distinct), with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, without which Ray rewrites 127.0.0.1 to the
  machine's outward address. `ray start` refuses to join a worker under that setting; the workers run
  the same `ray start` with only that refusal taken out (`RAY_START_ON_LOOPBACK`).
- Nodes on one address are told apart by the autoscaler by address, so it would take the workers
  for dead and restart them: `provider.worker_liveness_check: false`.
- Workers use the head's temp dir unless told otherwise, and two workers starting at once on one
  machine then race for the same socket names: a `--temp-dir` per node. Dashboard agents get port 0
  (they also listen on 127.0.0.1, where a fixed port would clash), and their metrics export ports
  are Ray's pick for the same reason (the template's 8080 left out); the GCS and Ray client ports
  are free ones, not Ray's defaults (another Ray on this machine may hold them).
- The test's checkpoint, service config and tokens replace the operator's.
`ray up` itself runs with RAY_UP_enable_autoscaler_v2=0 (v2 counts the head among the workers) and a
temp dir of its own, apart from the cluster's and from the machine's /tmp/ray.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from tests.cluster.sshd import (
    SshServer,
    SshUser,
    grant_access,
    install_packages,
    make_key,
    revoke_access,
)
from tests.conftest import free_port
from tests.reference import hf_greedy, starting_nodes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "configs" / "cluster-local.yaml"
USER = "rp-rayup-test"
HEAD, WORKERS = "127.0.0.2", ["127.0.0.3", "127.0.0.4"]
PROMPT, NEW_TOKENS = (1, 2, 3), 8
CLI = [sys.executable, "-m", "cluster.cli"]

# `ray start` past its one refusal to join a worker while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: the
# CLI reads that flag from its own reference to ray_constants; everything else (node address,
# bootstrap address) still reads the real one and keeps 127.0.0.1.
RAY_START_ON_LOOPBACK = (
    "~/ringpipe/.venv/bin/python -c " + shlex.quote(
        "import sys, types, ray._private.ray_constants as k; from ray.scripts import scripts; "
        "scripts.ray_constants = types.SimpleNamespace(**{**vars(k), 'ENABLE_RAY_CLUSTER': True}); "
        "sys.argv[0] = 'ray'; scripts.main()"
    ) + " start"
)

# A Ray driver as an operator's client: joins with the token, waits for the nodes, runs a task
# pinned to each; writes what it saw as JSON.
NODES_CHECK = """
import json, os, sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
deadline = time.monotonic() + float(sys.argv[2])
while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[3]) and time.monotonic() < deadline:
    time.sleep(0.5)
nodes = [n for n in ray.nodes() if n["Alive"]]

@ray.remote(num_cpus=0)
def where():
    return ray.get_runtime_context().get_node_id(), os.getuid()

pinned = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
          for n in nodes]
seen = {
    "nodes": [{"id": n["NodeID"], "address": n["NodeManagerAddress"], "cpus": n["Resources"].get("CPU", 0),
               "head": "node:__internal_head__" in n["Resources"]} for n in nodes],
    "ran": ray.get(pinned, timeout=60),
}
with open(sys.argv[4], "w") as out:
    json.dump(seen, out)
"""


def excerpt(text: str, tail: int = 2000) -> str:
    """The lines of a failed process's output that say why (a C++ abort prints its reason far from
    the end), then its tail."""
    why = [line for line in text.splitlines() if re.search(r"Check failed|Error|error:|refused|denied", line)]
    return "\n".join(why[:20]) + "\n...\n" + text[-tail:]


@dataclass
class RayUpCluster:
    base: Path
    user: SshUser
    sshd: SshServer
    config: Path
    launcher_env: dict[str, str]  # what `ray up` / `ray down` run with
    client_env: dict[str, str]  # what a client of the cluster runs with (Ray token, ringpipe token)
    gcs_address: str
    target: str  # the gRPC endpoint the deployed service will answer on
    checkpoint: Path
    up_s: float = 0.0
    is_up: bool = False
    seen: dict = field(default_factory=dict)

    def ray_down(self) -> subprocess.CompletedProcess:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "down", "-y", str(self.config)],
                              cwd=REPO, env=self.launcher_env, capture_output=True, text=True, timeout=180)
        (self.base / "ray-down.log").write_text(done.stdout + done.stderr)
        self.is_up = False
        self.seen["down_s"] = time.monotonic() - started
        return done

    def nodes(self) -> dict:
        """What a client sees once the 3 nodes are up (waits for them; run once, then remembered)."""
        if "nodes" not in self.seen:
            seen = self.base / "nodes.json"
            done = subprocess.run([sys.executable, "-c", NODES_CHECK, self.gcs_address, "120", "3", str(seen)],
                                  env=self.client_env, capture_output=True, text=True, timeout=240)
            assert done.returncode == 0 and seen.exists(), excerpt(done.stdout + done.stderr)
            self.seen["nodes"] = json.loads(seen.read_text())
        return self.seen["nodes"]

    def deploy_log(self) -> str:
        path = self.user.home / "ringpipe-deploy.log"
        return path.read_text() if path.exists() else "(no ~/ringpipe-deploy.log)"

    def deploy_running(self) -> bool:
        for proc in self.user.processes():
            try:
                if "ringpipe deploy" in " ".join(proc.cmdline()):
                    return True
            except psutil.NoSuchProcess:
                pass
        return False

    def wait_deployed(self, timeout_s: float = 300) -> None:
        """Until the head's background `ringpipe deploy` logs success; fails at once if it exits without."""
        deadline = time.monotonic() + timeout_s
        while "ringpipe deployed" not in self.deploy_log():
            running = self.deploy_running()
            log = self.deploy_log()
            if "ringpipe deployed" in log:
                break
            assert running, f"`ringpipe deploy` on the head exited:\n{excerpt(log)}"
            assert time.monotonic() < deadline, f"`ringpipe deploy` not done in {timeout_s:.0f}s:\n{log[-3000:]}"
            time.sleep(1)
        self.seen.setdefault("deployed_after_s", time.monotonic() - self.seen["up_started"])

    def logs(self) -> str:
        """The tail of what `ray up` / `ray down` printed, for failure messages."""
        out = []
        for name in ("ray-up.log", "ray-down.log"):
            path = self.base / name
            if path.exists():
                out.append(f"--- {name}\n{path.read_text()[-3000:]}")
        return "\n".join(out)


def cluster_config(template: dict, base: Path, user: SshUser, key: Path, gcs_port: int,
                   client_port: int) -> dict:
    """The template, pointed at this machine's SSH hosts and the test's files (see the module docstring)."""
    cfg = copy.deepcopy(template)
    cfg["cluster_name"] = f"ringpipe-test-{base.name.removeprefix('rpup-')}"
    cfg["provider"].update(head_ip=HEAD, worker_ips=WORKERS, worker_liveness_check=False)
    cfg["auth"] = {"ssh_user": user.name, "ssh_private_key": str(key)}
    assert {"~/.ray/auth_token", "~/.ringpipe/token", "~/ringpipe"} <= set(cfg["file_mounts"])
    cfg["file_mounts"].update({"~/.ray/auth_token": str(base / "ray_token"),
                               "~/.ringpipe/token": str(base / "ringpipe_token")})

    node_dir = f"{base}/n$(echo $SSH_CONNECTION | cut -d' ' -f3 | cut -d. -f4)"  # n2, n3, n4
    # --temp-dir is where the head writes the cluster's address, RAY_TMPDIR/ray where `--address auto`
    # (the deploy step) reads it: the same dir. (Not found there, `auto` would join whichever Ray it
    # finds running on the machine.)
    on_this_machine = f"export RAY_TMPDIR={node_dir} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_HEAD_IP=127.0.0.1; "
    node = (f" --temp-dir={node_dir}/ray --node-ip-address=127.0.0.1 --object-store-memory={200 << 20}"
            " --dashboard-agent-listen-port=0")

    def adapt(command: str, ray_start: str, flags: str) -> str:
        if ray_start in command:
            assert "6379" in command and " --metrics-export-port=8080" in command, command
            command = command.replace("6379", str(gcs_port)).replace(" --metrics-export-port=8080", "") + flags
        if "~/ringpipe/configs/serve.yaml" in command:  # the deploy step
            command = command.replace("~/ringpipe/configs/serve.yaml", str(base / "service.yaml"))
        return on_this_machine + command

    head_start = "~/ringpipe/.venv/bin/ray start --head"
    # no CPUs on the head: the stages go to the workers, as in `ringpipe serve --nodes`
    head_flags = f"{node} --num-cpus=0 --include-dashboard=false --ray-client-server-port={client_port}"
    cfg["head_start_ray_commands"] = [adapt(c, head_start, head_flags) for c in cfg["head_start_ray_commands"]]
    worker_start = "~/ringpipe/.venv/bin/ray start"
    cfg["worker_start_ray_commands"] = [
        adapt(c, worker_start, f"{node} --num-cpus=2").replace(worker_start, RAY_START_ON_LOOPBACK)
        for c in cfg["worker_start_ray_commands"]
    ]
    assert any("ringpipe deploy" in c and "service.yaml" in c for c in cfg["head_start_ray_commands"])
    assert all("ray stop" not in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    return cfg


def service_config(checkpoint: Path, port: int, http_port: int) -> dict:
    return {
        "model": {"path": str(checkpoint), "device": "cpu", "dtype": "float32"},
        "pipeline": {"stages": 2, "max_batch": 4, "max_seq_len": 128, "cpus_per_stage": 0.5,
                     "placement_strategy": "STRICT_SPREAD"},
        "replicas": {"count": 1, "standby": 0},
        "server": {"port": port, "http_port": http_port, "coordinators": 1, "proxy_location": "HeadOnly",
                   "auth": {"token_env": "RINGPIPE_TOKEN"}},
    }


def remove_control_paths(user: SshUser, cluster_name: str) -> None:
    """Remove the dirs of SSH ControlMaster sockets Ray's SSH runner made for this cluster:
    /tmp/ray_ssh_<user hash>/<cluster hash>, for `ray up` (as us) and the head's autoscaler (as
    the test user)."""
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:10]  # as Ray names them

    for login in (getpass.getuser(), user.name):
        shutil.rmtree(f"/tmp/ray_ssh_{digest(login)}/{digest(cluster_name)}", ignore_errors=True)
        try:
            os.rmdir(f"/tmp/ray_ssh_{digest(login)}")  # only when no other cluster's dir is left in it
        except OSError:
            pass


def our_ssh_clients(key: Path) -> list[psutil.Process]:
    """`ray up`'s SSH ControlMaster processes (they linger ControlPersist=10s after the last use)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        if proc.info["uids"] and proc.info["uids"].real == os.getuid() and str(key) in " ".join(
                proc.info["cmdline"] or []):
            found.append(proc)
    return found


def stop_all(procs: list[psutil.Process], timeout_s: float = 10) -> None:
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        proc.kill()


@pytest.fixture(scope="module")
def cluster():
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux: it adds a user and runs an sshd on port 22 of 127.0.0.2-4")
    try:
        install_packages()
    except FileNotFoundError as exc:  # no apt-get: not a Debian-like machine
        pytest.skip(f"cannot install openssh-server, rsync and acl here: {exc}")
    with ExitStack() as undo:
        base = Path(tempfile.mkdtemp(prefix="rpup-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        base.chmod(0o755)
        undo.callback(shutil.rmtree, base, ignore_errors=True)
        user = SshUser.create(USER, base / "home")
        undo.callback(user.remove)
        undo.callback(lambda: stop_all(user.processes()))  # only what the test itself did not see stop

        # the test user runs this venv and this checkout: let it pass the directories on the way
        venv = Path(sys.prefix)
        granted = grant_access(user, [REPO, venv / "bin" / "python"])
        undo.callback(revoke_access, user, granted)
        check = user.run(f"cd && {venv}/bin/python -c 'import ray, torch, cluster.cli, coordinator.app'")
        assert check.returncode == 0, f"the test user cannot run {venv}: {check.stderr[-2000:]}"

        key = make_key(base / "id_ed25519", "ray-up-test")
        sshd = SshServer(base / "sshd", [HEAD, *WORKERS], user, key.with_suffix(".pub"))
        sshd.start()
        undo.callback(sshd.stop)

        # the user's side: ~/ringpipe/.venv is this venv (the template's setup then skips the install),
        # and a Ray temp dir per node
        (user.home / "ringpipe").mkdir()
        (user.home / "ringpipe" / ".venv").symlink_to(venv)
        for path in (user.home / "ringpipe", user.home / "ringpipe" / ".venv"):
            os.lchown(path, user.uid, user.gid)
        for n in (2, 3, 4):
            (base / f"n{n}").mkdir()
            os.chown(base / f"n{n}", user.uid, user.gid)

        made = subprocess.run([*CLI, "model", "create", str(base / "model"), "--arch", "llama", "--layers", "4",
                               "--hidden", "64", "--vocab", "512", "--seed", "5"],
                              capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        for token in ("ray_token", "ringpipe_token"):
            (base / token).write_text(secrets.token_hex(32))
            (base / token).chmod(0o600)
        port, http_port, gcs_port, client_port = free_port(), free_port(), free_port(), free_port()
        (base / "service.yaml").write_text(yaml.safe_dump(service_config(base / "model", port, http_port)))
        config = cluster_config(yaml.safe_load(TEMPLATE.read_text()), base, user, key, gcs_port, client_port)
        (base / "cluster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (base / "launcher").mkdir()

        clean = {k: v for k, v in os.environ.items()
                 if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        launcher_env = {**clean, "RAY_UP_enable_autoscaler_v2": "0", "RAY_USAGE_STATS_ENABLED": "0",
                        "RAY_TMPDIR": str(base / "launcher"), "TMPDIR": str(base / "launcher")}
        client_env = {**clean, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                      "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(base / "ray_token"),
                      "RINGPIPE_TOKEN": (base / "ringpipe_token").read_text()}
        up = RayUpCluster(base, user, sshd, base / "cluster.yaml", launcher_env, client_env,
                          f"127.0.0.1:{gcs_port}", f"127.0.0.1:{port}", base / "model")

        undo.callback(remove_control_paths, user, config["cluster_name"])
        undo.callback(lambda: stop_all(our_ssh_clients(key)))
        undo.callback(lambda: up.ray_down() if up.is_up else None)
        started = up.seen["up_started"] = time.monotonic()
        up.is_up = True  # from here on, `ray down` at the end even if `ray up` fails half way
        with starting_nodes():  # until every node has joined
            done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "up", "-y", "--no-config-cache",
                                   str(up.config)], cwd=REPO, env=launcher_env, capture_output=True, text=True,
                                  timeout=300)
            up.up_s = time.monotonic() - started
            (base / "ray-up.log").write_text(done.stdout + done.stderr)
            assert done.returncode == 0, up.logs()
            up.nodes()
        yield up


def test_ray_up_starts_every_node(cluster):
    seen = cluster.nodes()
    nodes = seen["nodes"]
    assert len(nodes) == 3, (nodes, cluster.logs())
    assert {n["address"] for n in nodes} == {"127.0.0.1"}
    assert [n["head"] for n in nodes].count(True) == 1
    assert sorted(n["cpus"] for n in nodes) == [0, 2, 2]
    # a task ran on each node, as the test user: the nodes are the ones `ray up` started over SSH
    assert sorted(node for node, _ in seen["ran"]) == sorted(n["id"] for n in nodes)
    assert {uid for _, uid in seen["ran"]} == {cluster.user.uid}


def test_deployed_service_answers_as_transformers(cluster):
    """The head's start commands deployed ringpipe in the background: wait for it, then generate."""
    cluster.wait_deployed()
    assert f"gRPC on {cluster.target}" in cluster.deploy_log()

    generate = [*CLI, "generate", "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS),
                "--json", "--target", cluster.target]
    out = subprocess.run(generate, env=cluster.client_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, excerpt(out.stderr)
    assert json.loads(out.stdout.splitlines()[-1])["token_ids"] == hf_greedy(cluster.checkpoint, PROMPT, NEW_TOKENS)
    anonymous = {k: v for k, v in cluster.client_env.items() if k != "RINGPIPE_TOKEN"}
    refused = subprocess.run(generate, env=anonymous, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr[-2000:]

    status = subprocess.run([*CLI, "status", "--target", cluster.target, "--json"], env=cluster.client_env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr[-3000:]
    (replica,) = json.loads(status.stdout)["replicas"]
    stage_nodes = [s["node_id"] for s in replica["stages"]]
    workers = {n["id"] for n in cluster.nodes()["nodes"] if not n["head"]}
    assert len(set(stage_nodes)) == 2 and set(stage_nodes) == workers  # one stage on each worker node


def listeners(uid: int) -> list[tuple[str, str]]:
    """(local address, process) of every listening TCP socket of `uid`, from `ss`."""
    out = subprocess.run(["ss", "-Hltnpe"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        if re.search(rf"\buid:{uid}\b", line):
            process = re.search(r'users:\(\("([^"]+)"', line)
            found.append((line.split()[3], process.group(1) if process else "?"))
    return found


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
    return host.startswith("127.") or host == "::1"


def test_cluster_listens_on_loopback_only(cluster):
    """Everything the cluster's user runs, Ray and the deployed service, listens on loopback only."""
    cluster.wait_deployed()
    found = listeners(cluster.user.uid)
    assert any(address.endswith(":" + cluster.gcs_address.rsplit(":", 1)[1]) for address, _ in found), found
    assert any(address.endswith(":" + cluster.target.rsplit(":", 1)[1]) for address, _ in found), found
    outside = sorted({(address, process) for address, process in found if not is_loopback(address)})
    assert not outside, f"listening beyond loopback: {outside}"
    sshd = [line for line in subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout.splitlines()
            if f"pid={cluster.sshd.process.pid}," in line]
    assert sorted(line.split()[3] for line in sshd) == sorted(f"{ip}:22" for ip in [HEAD, *WORKERS])


def test_chaos_against_the_cluster_loses_nothing(cluster, tmp_path):
    """The operator's `ringpipe chaos`, joined through RAY_ADDRESS with the cluster's token: a node
    paused by a task placed on it, a stage and the coordinator killed, under load; nothing lost."""
    cluster.wait_deployed()
    report = tmp_path / "chaos"
    env = {**cluster.client_env, "RAY_ADDRESS": cluster.gcs_address}
    done = subprocess.run([*CLI, "chaos", "--target", cluster.target, "--report", str(report),
                           "--fault", "pause-node", "--fault", "kill-actor", "--fault", "kill-coordinator",
                           "--every", "8s", "--duration", "20s", "--warmup", "2s", "--cooldown", "3s",
                           "--pause", "3s", "--concurrency", "2", "--max-new-tokens", str(NEW_TOKENS),
                           "--pool", "4", "--seed", "3"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, excerpt(done.stdout + done.stderr, 4000)
    record = json.loads((report / "report.json").read_text())
    assert {f["kind"] for f in record["faults"]} == {"pause-node", "kill-actor", "kill-coordinator"}
    assert all(f["error"] is None and f["recovered_s"] is not None for f in record["faults"]), record["faults"]
    paused = next(f for f in record["faults"] if f["kind"] == "pause-node")
    workers = {n["id"][:12] for n in cluster.nodes()["nodes"] if not n["head"]}
    assert paused["target"].split()[1] in workers  # a worker node, never the head
    requests = record["requests"]
    assert requests and all(r["ok"] and not r["mismatch"] and not r["repeated"] and not r["lost"] for r in requests)
    greedy = next(e for e in record["pool"] if not e["sampling"])
    assert greedy["expected"] == hf_greedy(cluster.checkpoint, tuple(greedy["prompt"]), NEW_TOKENS)


def test_ray_down_leaves_nothing_running(cluster):
    done = cluster.ray_down()
    assert done.returncode == 0, cluster.logs()
    # `ray down` returns once `ray stop` has. The SSH connections it (as us) and the head's autoscaler
    # (as the test user) opened stay up ControlPersist (10 s) after their last use, and with them
    # their sessions' processes on the "nodes": close those clients, then nothing may be left
    stop_all(our_ssh_clients(cluster.base / "id_ed25519") + [p for p in cluster.user.processes() if p.name() == "ssh"])
    deadline = time.monotonic() + 40
    while cluster.user.processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [(p.pid, " ".join(p.cmdline())[:120]) for p in cluster.user.processes()]
    assert not left, f"still running as {cluster.user.name} after ray down: {left}"
    pid = cluster.sshd.process.pid
    cluster.sshd.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    print(f"ray up {cluster.up_s:.0f}s; deployed {cluster.seen.get('deployed_after_s', float('nan')):.0f}s "
          f"after ray up started; ray down {cluster.seen['down_s']:.0f}s")
