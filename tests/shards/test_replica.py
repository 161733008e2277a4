"""One pipeline replica on a real local Ray cluster, checked against transformers.

Expected tokens come from `transformers` (greedy `generate`) on the same
checkpoint; batching and sampling properties compare a request with itself run
in other company.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from shards.create import RandomModelSpec, create_random_checkpoint
from shards.errors import ReplicaFailed, RequestError
from shards.replica import Replica, make_request
from shards.sampling import SamplingParams
from shards.spec import ReplicaSpec
from tests.reference import hf_greedy, wait_for

# (arch, overrides) chosen so greedy continuations are varied, not one token repeated
MODELS = {
    "llama": dict(arch="llama", seed=1),
    "qwen2": dict(arch="qwen2", seed=8, tie_word_embeddings=True),
    "mistral": dict(arch="mistral", seed=1, sliding_window=8),
    "glm": dict(arch="glm", seed=1, head_dim=32),
}
PROMPTS = [
    [5, 17, 33, 100, 250, 7, 9, 12, 44, 3],
    [8, 1, 99],
    [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213],
    [42],
    [77, 66, 55, 44, 33],
    [3, 141, 59, 26, 53, 58],
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replica-ckpt")
    out = {}
    for name, overrides in MODELS.items():
        spec = RandomModelSpec(layers=5, hidden=64, heads=4, kv_heads=2, vocab=300, **overrides)
        out[name] = create_random_checkpoint(root / name, spec)
    return out


def start_replica(model_dir: Path, stages: int, **overrides) -> Replica:
    spec = ReplicaSpec(
        model_dir=str(model_dir), stages=stages, max_batch=4, max_seq_len=256, prefill_chunk=4, **overrides
    )
    replica = Replica(spec)
    replica.start()
    return replica


# one stage holds every layer, embedding and head together (qwen2's tied head beside its embedding);
# three have a first, a middle and a last stage, every kind of cut (two stages: `llama2` below)
@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("arch", list(MODELS))
def test_greedy_matches_transformers(ray_cluster, checkpoints, arch, stages):
    expected = [hf_greedy(checkpoints[arch], tuple(p), NEW_TOKENS) for p in PROMPTS[:2]]
    assert len(set(expected[0])) >= 8, "reference continuation is degenerate; pick another seed"
    replica = start_replica(checkpoints[arch], stages)
    try:
        for i, prompt in enumerate(PROMPTS[:2]):
            result = replica.generate(make_request(prompt, NEW_TOKENS))
            assert result.token_ids == expected[i]
            assert result.finish_reason == "length"
        plans = replica.plans
        assert [p.layer_start for p in plans][0] == 0 and plans[-1].layer_end == 5
        stats = replica.stats()
        for plan, stat in zip(plans, stats, strict=True):
            assert stat["weight_bytes"] == plan.weight_bytes  # loaded exactly its planned tensors
            assert stat["kv_bytes"] == plan.kv_bytes
    finally:
        replica.shutdown()


@pytest.fixture(scope="module")
def llama2(ray_cluster, checkpoints):
    replica = start_replica(checkpoints["llama"], 2)
    yield replica
    replica.shutdown()


def test_continuous_batching_staggered_arrivals(llama2, checkpoints):
    """More requests than KV slots, arriving while others decode, each gets its solo tokens."""
    results: dict[int, list[int]] = {}
    progress: dict[int, int] = {i: 0 for i in range(len(PROMPTS))}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            tokens: list[int] = []
            for item in llama2.stream(make_request(PROMPTS[i], NEW_TOKENS)):
                tokens.extend(item["tokens"])
                progress[i] = len(tokens)
            results[i] = tokens
        except BaseException as exc:  # noqa: BLE001 — reported by the main thread
            errors.append(exc)

    threads = []
    for i in range(len(PROMPTS)):
        t = threading.Thread(target=run, args=(i,))
        t.start()
        threads.append(t)
        if i % 2 == 1:  # the next requests arrive mid-generation of this one
            wait_for(lambda i=i: progress[i] >= 3 or i in results or errors, what=f"request {i} to stream")
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, prompt in enumerate(PROMPTS):
        assert results[i] == hf_greedy(checkpoints["llama"], tuple(prompt), NEW_TOKENS), f"prompt {i}"
    assert llama2.stats()[0]["free_slots"] == 4


def test_seeded_sampling_independent_of_batch(llama2):
    sampling = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone = llama2.generate(make_request(PROMPTS[0], NEW_TOKENS, sampling)).token_ids

    outputs: dict[str, list[int]] = {}

    def run(key: str, prompt: list[int], params: SamplingParams) -> None:
        outputs[key] = llama2.generate(make_request(prompt, NEW_TOKENS, params)).token_ids

    companions = [
        threading.Thread(target=run, args=(f"other{i}", PROMPTS[i], SamplingParams(0.7, 0, 1.0, i)))
        for i in (1, 2, 3)
    ]
    target = threading.Thread(target=run, args=("target", PROMPTS[0], sampling))
    for t in [*companions[:2], target, companions[2]]:
        t.start()
    for t in [*companions, target]:
        t.join(120)
    assert outputs["target"] == alone
    other_seed = llama2.generate(
        make_request(PROMPTS[0], NEW_TOKENS, SamplingParams(0.9, 50, 0.95, seed=99))
    ).token_ids
    assert other_seed != alone  # the seed matters (a sampler ignoring it would pass the first check)


def test_stop_tokens_and_eos(llama2, checkpoints):
    expected = hf_greedy(checkpoints["llama"], tuple(PROMPTS[0]), NEW_TOKENS)
    stop = expected[5]
    first = expected.index(stop)
    result = llama2.generate(make_request(PROMPTS[0], NEW_TOKENS, stop_token_ids={stop}))
    assert result.token_ids == expected[: first + 1]
    assert result.finish_reason == "stop"


def test_bad_requests_name_the_field(llama2):
    with pytest.raises(RequestError, match="prompt"):
        llama2.generate(make_request([], 4))
    with pytest.raises(RequestError, match="prompt"):
        llama2.generate(make_request([1] * 300, 4))
    with pytest.raises(RequestError, match="vocabulary"):
        llama2.generate(make_request([1, 300], 4))
    with pytest.raises(RequestError, match="max_new_tokens"):
        llama2.generate(make_request([1, 2], 0))
    assert llama2.generate(make_request([1, 2], 3)).finish_reason == "length"  # still serving


def test_cancel_frees_slot(llama2):
    stream = llama2.stream(make_request(PROMPTS[0], 200))
    next(stream)
    assert llama2.stats()[0]["free_slots"] == 3
    stream.close()  # the caller goes away
    wait_for(lambda: llama2.stats()[0]["free_slots"] == 4, 30, "the slot to be freed")


def test_killed_stage_fails_fast_and_frees_survivors(ray_cluster, checkpoints):
    # the stage after the killed one learns of it when its receive times out: 3 s here, not 10
    replica = start_replica(checkpoints["llama"], 3, transport_timeout_s=3.0, keepalive_s=0.5)
    try:
        outcome: dict[str, object] = {}
        got_tokens = threading.Event()

        def run() -> None:
            try:
                for _ in replica.stream(make_request(PROMPTS[0], 230)):
                    got_tokens.set()
                outcome["result"] = "finished"
            except BaseException as exc:  # noqa: BLE001
                outcome["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        assert got_tokens.wait(60)
        replica.kill_stage(1)
        thread.join(60)
        assert not thread.is_alive(), "generation hung after a stage died"
        error = outcome.get("error")
        assert isinstance(error, ReplicaFailed), outcome
        assert "stage 1" in str(error)
        wait_for(lambda: [p and p["state"] for p in replica.ping()] == ["failed", None, "failed"], 30,
                 "survivors to stop their loops")
        with pytest.raises(ReplicaFailed):  # new work is refused with the reason, not queued forever
            replica.generate(make_request([1, 2], 3))
    finally:
        replica.shutdown()


def test_hung_stage_times_out(ray_cluster, checkpoints):
    """A stage that stops answering (SIGSTOP) fails its peers after the group timeout, not never."""
    replica = start_replica(checkpoints["llama"], 2, transport_timeout_s=3.0, keepalive_s=0.5)
    pid = replica.nodes()[1]["pid"]
    try:
        assert replica.generate(make_request([1, 2, 3], 4)).finish_reason == "length"
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: replica.ping(timeout_s=1)[0]["state"] == "failed", 60, "the head to time out")
        assert "stage 0" in replica.stats(timeout_s=1)[0]["error"]  # the stopped stage cannot answer: 1 s for it
    finally:
        os.kill(pid, signal.SIGCONT)
        replica.shutdown()


def test_control_calls_answer_while_generating(llama2):
    """ping/stats are served by the actor while its step loop computes in its thread."""
    stream = llama2.stream(make_request(PROMPTS[2], 200))
    seen = len(next(stream)["tokens"])
    pings = llama2.ping(timeout_s=10)
    assert [p["state"] for p in pings] == ["serving", "serving"]
    assert llama2.stats()[0]["running"] == 1  # our request is still mid-generation
    for item in stream:
        seen += len(item["tokens"])
    assert seen == 200


# two bf16 logits of this size (|x| < 8) closer than this are a tie: a few rounding steps (2^-5 at 4..8)
BF16_TIE = 0.0625


def test_bfloat16_replica(ray_cluster, checkpoints):
    """bf16 on CPU: the pipeline gives the one-process bf16 tokens, and logits stay near transformers' bf16."""
    from transformers import AutoModelForCausalLM

    from shards.inprocess import InProcessModel

    model_dir = checkpoints["llama"]
    local = InProcessModel(model_dir, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        hf_logits = hf(torch.tensor([PROMPTS[0]])).logits[0].float()
    ours = local.prefill_logits(PROMPTS[0]).float()
    assert torch.allclose(ours, hf_logits, atol=0.25), float((ours - hf_logits).abs().max())
    assert float(ours.abs().max()) < 8  # the scale BF16_TIE is set for
    replica = start_replica(model_dir, 2, dtype="bfloat16")
    try:
        tokens = replica.generate(make_request(PROMPTS[0], 16)).token_ids
        assert replica.stats()[0]["weight_bytes"] == replica.plans[0].params * 2
    finally:
        replica.shutdown()
    # bf16 greedy tokens are not comparable one for one: the pipeline prefills in chunks and
    # decodes in other shapes, so a near tie (two logits a rounding step apart) may go either
    # way and the streams then part. What must hold: fed the pipeline's own tokens, the
    # one-process bf16 model finds each of them the best, or within bf16 rounding of it.
    n = len(PROMPTS[0])
    logits = local.prefill_logits(PROMPTS[0] + tokens).float()[n - 1 : n - 1 + len(tokens)]
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    gaps = logits.max(dim=-1).values - chosen
    assert len(tokens) == 16 and float(gaps.max()) <= BF16_TIE, gaps.tolist()


# native: plain GQA and GLM's fused gate_up (qwen2's biases go through the same slicing as DeepSpeed's,
# `test_tp_load.py`); deepspeed: qwen2 (llama's layers plus biases) and GLM. Mistral differs from llama
# only in its attention mask, which tensor parallelism does not touch.
@pytest.mark.parametrize(("arch", "engine"), [("llama", "native"), ("glm", "native"),
                                             ("qwen2", "deepspeed"), ("glm", "deepspeed")])
def test_tensor_parallel_stages_match_transformers(ray_cluster, checkpoints, arch, engine):
    """Two stages of two tensor-parallel ranks each (Gloo all-reduce on CPU), with our layers or
    DeepSpeed's, give transformers' tokens (GQA, qwen2's biases, GLM's fused gate_up and partial
    rotary); spread over nodes, each stage's ranks on one node (its all-reduces never cross the network)."""
    expected = hf_greedy(checkpoints[arch], tuple(PROMPTS[0]), NEW_TOKENS)
    replica = start_replica(checkpoints[arch], 2, tensor_parallel=2, placement_strategy="SPREAD", tp_engine=engine)
    try:
        assert len(replica.actors) == 4
        nodes = [n["node_id"] for n in ray_cluster.get([a.node.remote() for a in replica.actors])]  # rank = stage * 2 + t
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2], nodes
        assert replica.generate(make_request(PROMPTS[0], NEW_TOKENS)).token_ids == expected
        follower = replica.stats()[1]
        assert follower["steps"] > 0  # the second rank really computed
        assert follower["weight_bytes"] < replica.plans[0].weight_bytes  # and holds a slice
        assert follower["row_layer"] == {"native": "RowParallelLinear", "deepspeed": "LinearAllreduce"}[engine]
    finally:
        replica.shutdown()


def test_dead_tensor_parallel_rank_fails_the_replica(ray_cluster, checkpoints):
    replica = start_replica(checkpoints["llama"], 1, tensor_parallel=2)
    try:
        assert replica.generate(make_request([1, 2, 3], 4)).finish_reason == "length"
        replica.kill_stage(0, tp_rank=1)
        wait_for(lambda: replica.ping(timeout_s=1)[0]["state"] == "failed", 60, "the head to notice")
        with pytest.raises(ReplicaFailed, match="stage 0"):
            replica.generate(make_request([1, 2, 3], 4))
    finally:
        replica.shutdown()


def test_prefix_reuse_gives_the_same_tokens(ray_cluster, checkpoints):
    """A follow-up turn reuses the finished turn's KV and still matches transformers (and no-reuse)."""
    model_dir = checkpoints["glm"]
    turn1 = hf_greedy(model_dir, tuple(PROMPTS[0]), 8)
    follow_up = [*PROMPTS[0], *turn1, 11, 12, 13]
    expected = hf_greedy(model_dir, tuple(follow_up), 12)
    outputs = {}
    for cache in (True, False):
        replica = start_replica(model_dir, 2, prefix_cache=cache)
        try:
            assert replica.generate(make_request(PROMPTS[0], 8)).token_ids == turn1
            outputs[cache] = replica.generate(make_request(follow_up, 12)).token_ids
            reused = replica.stats()[0]["reused_tokens"]
            assert reused == (len(PROMPTS[0]) + 7 if cache else 0)
        finally:
            replica.shutdown()
    assert outputs[True] == outputs[False] == expected
