"""A request whose logits turn NaN (here: a checkpoint whose embedding of one token is NaN, as a
float16 overflow or a broken weight would make them) ends with `NonFiniteLogits`, greedy or sampled,
instead of a token drawn from NaNs (or, sampled, the sampler's crash taking the replica down); the
requests beside it in the same batches finish with transformers' tokens. No Ray: `Stage` is plain
Python, one stage here."""

from __future__ import annotations

import queue
import shutil

import pytest
from safetensors.torch import load_file, save_file

from shards.errors import NonFiniteLogits
from shards.sampling import SamplingParams
from shards.scheduler import GenerationRequest
from tests.reference import hf_greedy
from tests.shards.one_stage import started_stage

POISON = 7  # the token whose embedding is NaN
NEW = 6


@pytest.fixture
def poisoned(make_checkpoint, tmp_path):
    source = make_checkpoint("llama", vocab=128, layers=2, hidden=32)
    target = tmp_path / "poisoned"
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    tensors["model.embed_tokens.weight"][POISON] = float("nan")
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return source, target


def test_nan_logits_end_that_request_only(poisoned):
    clean, model_dir = poisoned
    # the neighbours: prompts whose clean greedy continuation never touches the poisoned token
    candidates = [(3, 4, 5), (10, 11), (20, 21, 22, 23), (40, 2), (50, 51, 52), (60, 61)]
    healthy = [p for p in candidates if POISON not in hf_greedy(clean, p, NEW)][:2]
    assert len(healthy) == 2
    stage = started_stage(model_dir, "nan")
    events: queue.Queue = queue.Queue()
    try:
        requests = [
            GenerationRequest("greedy-nan", (1, POISON, 2), NEW),
            GenerationRequest("sampled-nan", (POISON, 9), NEW, SamplingParams(temperature=0.8, seed=3)),
            *(GenerationRequest(f"ok-{i}", p, NEW) for i, p in enumerate(healthy)),
        ]
        for r in requests:
            stage.submit(r, lambda ev, rid=r.request_id: events.put((rid, ev)))
        tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
        errors: dict[str, BaseException] = {}
        done = set()
        while len(done) < len(requests):
            rid, ev = events.get(timeout=60)
            if isinstance(ev, BaseException):
                errors[rid] = ev
                done.add(rid)
                continue
            if ev.token is not None:
                tokens[rid].append(ev.token)
            if ev.finish_reason:
                done.add(rid)
        assert set(errors) == {"greedy-nan", "sampled-nan"}, errors
        assert all(isinstance(e, NonFiniteLogits) and "NaN or infinite" in str(e) for e in errors.values())
        for i, prompt in enumerate(healthy):
            assert tokens[f"ok-{i}"] == hf_greedy(clean, prompt, NEW)
        # the replica goes on; the healthy requests' KV is kept as prefixes, the poisoned ones' is not
        assert stage.state.value == "serving" and len(stage.scheduler.cached) == len(healthy)
        assert stage.scheduler.free_slots == stage.spec.max_batch
    finally:
        stage.shutdown()
