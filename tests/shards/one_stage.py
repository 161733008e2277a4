"""A one-stage replica's `Stage` in this process, loaded and stepping: no Ray (`Stage` is plain Python)."""

from __future__ import annotations

from pathlib import Path

from shards.checkpoint import read_model_args
from shards.partition import plan_stages
from shards.spec import ReplicaSpec
from shards.stage import Stage


def started_stage(model_dir: Path, name: str, **spec) -> Stage:
    """4 KV slots of 64 tokens and one torch thread unless `spec` says otherwise; shut it down after."""
    spec = ReplicaSpec(**{"model_dir": str(model_dir), "stages": 1, "max_batch": 4, "max_seq_len": 64,
                          "torch_threads": 1, **spec})
    args = read_model_args(model_dir)
    (plan,) = plan_stages(args, 1, spec.max_batch, spec.max_seq_len, spec.torch_dtype)
    stage = Stage(spec, plan, args, name)
    stage.load()
    stage.start()
    return stage
