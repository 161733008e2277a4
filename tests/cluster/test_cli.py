"""The `ringpipe` command as a user runs it: subprocesses, real Ray, transformers as the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    result = ringpipe("run", "--model", str(glm_dir), "--stages", "3", "--prompt-ids", ",".join(map(str, prompt)),
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
    assert "stage 2: layers" in result.stderr  # memory per stage is reported before serving


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
