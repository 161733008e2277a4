"""A stage that cannot fit its device is refused before it allocates anything, with the numbers and
the settings to change; one that fits loads. No Ray: `Stage` is plain Python."""

from __future__ import annotations

import psutil
import pytest

from shards.checkpoint import read_model_args
from shards.errors import DoesNotFit
from shards.partition import plan_stages
from shards.spec import ReplicaSpec
from shards.stage import Stage


def _stage(model_dir, max_batch: int, max_seq_len: int, **spec) -> Stage:
    spec = ReplicaSpec(model_dir=str(model_dir), stages=1, max_batch=max_batch, max_seq_len=max_seq_len,
                       torch_threads=1, **spec)
    args = read_model_args(model_dir)
    (plan,) = plan_stages(args, 1, max_batch, max_seq_len, spec.torch_dtype)
    return Stage(spec, plan, args, "fits")


def test_kv_slots_beyond_free_memory_are_refused_before_allocating(make_checkpoint):
    checkpoint = make_checkpoint("llama", vocab=128, layers=2, hidden=32)
    rss_before = psutil.Process().memory_info().rss
    stage = _stage(checkpoint, max_batch=1024, max_seq_len=1 << 20)  # KV far beyond this machine's RAM
    assert stage.plan.kv_bytes > psutil.virtual_memory().available  # the premise, from the plan's own sum
    with pytest.raises(DoesNotFit) as refused:
        stage.load()
    message = str(refused.value)
    assert "GiB free" in message and "pipeline.max_batch 1024" in message and "pipeline.max_seq_len" in message
    assert f"{stage.plan.kv_bytes / (1 << 30):.2f} GiB of KV slots" in message
    assert stage.model is None and stage.cache is None
    assert psutil.Process().memory_info().rss - rss_before < 1 << 30  # nothing of the ~TiB was touched


def test_a_forward_too_large_for_memory_is_refused_naming_its_setting(make_checkpoint):
    """Weights and KV slots fit, but one forward of `max_prefill_tokens` tokens could not: its
    residual stream alone (tokens x hidden x 4 bytes) is more than the machine has."""
    checkpoint = make_checkpoint("llama", vocab=128, layers=2, hidden=32)
    tokens = psutil.virtual_memory().total // (32 * 4) + 1  # the premise: tokens * hidden * 4 > all RAM
    stage = _stage(checkpoint, max_batch=2, max_seq_len=64, max_prefill_tokens=tokens)
    with pytest.raises(DoesNotFit) as refused:
        stage.load()
    message = str(refused.value)
    assert "GiB of activations" in message and f"pipeline.max_prefill_tokens {tokens}" in message
    assert stage.model is None


def test_a_stage_that_fits_loads(make_checkpoint):
    stage = _stage(make_checkpoint("llama", vocab=128, layers=2, hidden=32), max_batch=2, max_seq_len=64)
    memory = stage.load()
    assert memory["kv_bytes"] == stage.plan.kv_bytes and memory["weight_bytes"] > 0
