"""The `ringpipe` command as a user runs it: subprocesses, real Ray, transformers as the reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.reference import starting_nodes

RINGPIPE = [sys.executable, "-m", "cluster.cli"]
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
ENV.pop("RAY_ADDRESS", None)


def ringpipe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RINGPIPE, *args], capture_output=True, text=True, env=ENV, timeout=timeout,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_help_explains_every_command():
    top = ringpipe("--help")
    assert top.returncode == 0
    for word in ("model", "run", "examples"):
        assert word in top.stdout
    run = ringpipe("run", "--help")
    for flag in ("--stages", "--prompt-ids", "--max-new-tokens", "--temperature", "--top-p", "--json"):
        assert flag in run.stdout
    assert "--arch" in ringpipe("model", "create", "--help").stdout


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "glm"
    made = ringpipe("model", "create", str(out), "--arch", "glm", "--layers", "5", "--hidden", "64",
                    "--heads", "4", "--kv-heads", "2", "--vocab", "300", "--seed", "3", "--max-shard-mb", "1")
    assert made.returncode == 0, made.stderr
    return out


def test_model_create_writes_hf_layout(glm_dir):
    from transformers import AutoConfig

    assert (glm_dir / "model.safetensors.index.json").is_file()  # sharded: 1 MiB shards
    cfg = AutoConfig.from_pretrained(glm_dir)
    assert cfg.model_type == "glm" and cfg.num_hidden_layers == 5


def test_run_json_matches_transformers(glm_dir):
    from transformers import AutoModelForCausalLM

    prompt = [11, 22, 33, 44, 55]
    with starting_nodes():  # `run` starts a one-node Ray of its own
        result = ringpipe("run", "--model", str(glm_dir), "--stages", "2", "--prompt-ids", ",".join(map(str, prompt)),
                          "--max-new-tokens", "12", "--ignore-eos", "--json", "--tensor-parallel", "2",
                          "--tp-engine", "deepspeed")  # DeepSpeed's layers; test_replica.py has ours
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(glm_dir).eval()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out["token_ids"] == seq[len(prompt):]
    assert "stage 1: layers" in result.stderr  # memory per stage is reported before serving


def test_run_errors_are_one_line(glm_dir, tmp_path):
    no_tok = ringpipe("run", "--model", str(glm_dir), "--prompt", "hello")
    assert no_tok.returncode != 0 and "tokenizer.json" in no_tok.stderr and "Traceback" not in no_tok.stderr
    missing = ringpipe("run", "--model", str(tmp_path / "nope"), "--prompt-ids", "1")
    assert missing.returncode != 0 and "config.json" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  path: {glm_dir}\npipeline:\n  stages: 0\n")
    cfg = ringpipe("run", "--config", str(bad), "--prompt-ids", "1")
    assert cfg.returncode != 0 and "pipeline.stages" in cfg.stderr
    ids = ringpipe("run", "--model", str(glm_dir), "--prompt-ids", "1,x")
    assert ids.returncode != 0 and "--prompt-ids" in ids.stderr


def test_commands_given_no_ray_cluster_say_so_in_one_line(tmp_path):
    """A Ray address where nothing listens: one line naming it, not Ray's minutes of retries."""
    from tests.conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    for args in (("chaos", "--target", "127.0.0.1:1", "--report", str(tmp_path / "r")),
                 ("undeploy",)):
        done = ringpipe(*args, "--address", address, timeout=120)
        assert done.returncode != 0 and f"no Ray cluster at {address}" in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize("seed", ["-1", "2x", str(2**64)])
def test_generate_refuses_a_seed_outside_uint64_in_one_line(seed):
    out = ringpipe("generate", "hi", "--temperature", "0.5", "--seed", seed, "--target", "127.0.0.1:1", timeout=60)
    assert out.returncode == 2 and "--seed" in out.stderr and "Traceback" not in out.stderr


def test_ray_outside_the_tested_range_is_refused_in_one_line(tmp_path):
    """The range pyproject.toml declares is the one checked at start; a Ray outside it is one line."""
    from cluster.local import RAY_REQUIREMENT, ray_unsupported

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"{RAY_REQUIREMENT}"' in pyproject
    assert ray_unsupported("2.60.0") is None and ray_unsupported("2.60.3") is None
    for version in ("2.40.0", "2.59.1", "2.61.0", "3.0.0"):
        why = ray_unsupported(version)
        assert why and f"Ray {version}" in why and RAY_REQUIREMENT in why
    assert "not installed" in ray_unsupported(None)
    # end to end: a Ray 2.40.0 distribution first on the path (its metadata only: Ray is never imported)
    fake = tmp_path / "site"
    (fake / "ray-2.40.0.dist-info").mkdir(parents=True)
    (fake / "ray-2.40.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ray\nVersion: 2.40.0\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(fake), str(Path(__file__).resolve().parents[2]),
                                                 ENV.get("PYTHONPATH", "")])}
    done = subprocess.run([*RINGPIPE, "undeploy", "--address", "127.0.0.1:1"], capture_output=True, text=True,
                          env=env, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2 and "Ray 2.40.0" in done.stderr and RAY_REQUIREMENT in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_choosing_among_the_clusters_of_this_machine():
    from cluster.local import NoRayCluster, choose_cluster

    assert choose_cluster({"127.0.0.1:6379"}) == "127.0.0.1:6379"
    with pytest.raises(NoRayCluster, match="no Ray cluster runs on this machine.*--address"):
        choose_cluster(set())
    with pytest.raises(NoRayCluster, match=r"2 Ray clusters .*127.0.0.1:1111, 127.0.0.1:2222.*--address"):
        choose_cluster({"127.0.0.1:2222", "127.0.0.1:1111"})


# Run as PID 1 of a PID namespace of its own (`unshare --pid --mount-proc`): the only Ray clusters
# it sees are those it starts, and all it started dies with it. Prints what each command said.
ISOLATED = """
import json, os, subprocess, sys
CLI = [sys.executable, "-m", "cluster.cli"]
def cli(*args, **env):
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    return [done.returncode, done.stderr, done.stdout]
out = {"none": {c: cli(c, *a) for c, *a in (("chaos", "--report", "r", "--target", "127.0.0.1:1"),
                                            ("deploy", "--config", "x.yaml"), ("undeploy",))}}
head = subprocess.Popen([sys.executable, "-c", "import ray, sys; ray.init(address='local', num_cpus=1, "
                         "include_dashboard=False, _node_ip_address='127.0.0.1'); "
                         "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
out["address"] = head.stdout.readline().strip()
# a cluster ray.init starts wants Ray's token (Ray 2.60); Ray's driver retries its first GCS read
# 20 times a second apart before it gives up: 2 say the same, sooner
out["no_token"] = cli("undeploy", RAY_NUM_REDIS_GET_RETRIES="2")
out["chaos"] = cli("chaos", "--report", "r", "--target", "127.0.0.1:1", RAY_AUTH_MODE="token")
out["undeploy"] = cli("undeploy", RAY_AUTH_MODE="token")
head.stdin.close()
head.wait(60)
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_commands_find_the_cluster_of_this_machine_or_say_what_to_pass(tmp_path):
    """No cluster, a cluster without ringpipe, a cluster that wants Ray's token: one line each, no traceback;
    with one cluster running and no --address, it is the one joined (as `ray status` finds it)."""
    repo = str(Path(__file__).resolve().parents[2])
    env = {**ENV, "PYTHONPATH": os.pathsep.join(p for p in (repo, ENV.get("PYTHONPATH")) if p)}
    with starting_nodes():  # it starts a one-node Ray
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", ISOLATED],
                              capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for command, (code, stderr, _) in out["none"].items():
        assert code == 2 and stderr.startswith("ringpipe: error: no Ray cluster runs on this machine"), (command, stderr)
        assert "--address" in stderr and len(stderr.strip().splitlines()) == 1
    address = out["address"]
    code, stderr, _ = out["no_token"]
    assert code == 2 and f"the Ray cluster at {address} wants Ray's auth token: set RAY_AUTH_MODE=token" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr
    code, stderr, _ = out["chaos"]
    assert code == 2 and f"no ringpipe service runs in the Ray cluster at {address}" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr
    code, stderr, stdout = out["undeploy"]
    assert code == 0 and f"nothing of ringpipe was running on the Ray cluster at {address}" in stdout, stderr[-3000:]


def test_serve_says_which_port_is_taken(glm_dir, tmp_path):
    """Checked before anything starts: the port, its address and the setting that moves it."""
    import socket

    from tests.conftest import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        grpc_taken = ringpipe("serve", "--model", str(glm_dir), "--port", str(port), timeout=60)
        config = tmp_path / "serve.yaml"
        config.write_text(f"model:\n  path: {glm_dir}\nserver:\n  port: {free_port()}\n  http_port: {port}\n")
        http_taken = ringpipe("serve", "--config", str(config), timeout=60)
    assert grpc_taken.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in grpc_taken.stderr
    assert "server.port, or --port" in grpc_taken.stderr and "Traceback" not in grpc_taken.stderr
    assert http_taken.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in http_taken.stderr
    assert "server.http_port" in http_taken.stderr and "Traceback" not in http_taken.stderr


def test_calls_to_no_service_say_where_to_point(tmp_path):
    from tests.conftest import free_port

    target = f"127.0.0.1:{free_port()}"
    for args in (("status",), ("generate", "hi")):
        done = ringpipe(*args, "--target", target, timeout=60)
        assert done.returncode == 1 and done.stderr.startswith("ringpipe: UNAVAILABLE: ")
        assert f"nothing listens at {target}" in done.stderr and "--target" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
