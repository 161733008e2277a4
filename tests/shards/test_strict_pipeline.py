"""The real stage loop (`shards.stage.Stage`, one process per stage, no Ray) under NCCL's point-to-point
discipline: the "strict" test backend (`strict_pg.py`, a FAKE of NCCL: no GPU here), where a send
completes only once the peer has posted the matching receive, and each pair's operations on one group
run in order. S = 2 and S = 3 under continuous batching (more requests than slots, prompts of
several prefill chunks, arriving while others decode): every request completes with transformers'
greedy tokens. With the head and the last stage sending to each other on one group, S = 2 deadlocks
here (and on NCCL) until the transport timeout fails the replica.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import time

import pytest

from tests.reference import hf_greedy

PROMPTS = [tuple((7 * i + 3 * j) % 120 + 1 for j in range(n)) for i, n in enumerate((40, 3, 17, 33, 5, 26))]
NEW_TOKENS = 12
TIMEOUT_S = 20.0


def _stage(rank: int, stages: int, model_dir: str, ports, results) -> None:
    from tests.shards.strict_pg import register

    register()
    from shards.checkpoint import read_model_args
    from shards.partition import plan_stages
    from shards.scheduler import GenerationRequest
    from shards.spec import ReplicaSpec
    from shards.stage import Stage, StageState

    spec = ReplicaSpec(model_dir=model_dir, stages=stages, max_batch=4, max_queue=8, max_seq_len=96,
                       prefill_chunk=16, torch_threads=1, transport_timeout_s=TIMEOUT_S,
                       transport_backend="strict")
    args = read_model_args(model_dir)
    plans = plan_stages(args, stages, spec.max_batch, spec.max_seq_len, spec.torch_dtype)
    stage = Stage(spec, plans[rank], args, "strict")
    try:
        if rank == 0:
            port = stage.open_rendezvous("127.0.0.1")
            for _ in range(stages - 1):
                ports.put(port)
        else:
            port = ports.get(timeout=60)
        stage.connect("127.0.0.1", port)
        stage.load()
        stage.start()
        if rank != 0:
            while stage.state is StageState.SERVING:  # until the head's STOP comes down, or the link fails
                time.sleep(0.1)
            return
        out: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
        ended: queue_mod.Queue = queue_mod.Queue()

        def sink_for(i: int):
            def sink(event) -> None:
                if isinstance(event, BaseException):
                    ended.put((i, f"{type(event).__name__}: {event}"))
                    return
                if event.token is not None:
                    out[i].append(event.token)
                if event.finish_reason:
                    ended.put((i, None))
            return sink

        for i, prompt in enumerate(PROMPTS):  # 6 requests for 4 slots, arriving while others decode
            stage.submit(GenerationRequest(f"r{i}", prompt, NEW_TOKENS), sink_for(i))
            time.sleep(0.05)
        errors = {}
        for _ in PROMPTS:
            i, error = ended.get(timeout=4 * TIMEOUT_S)
            if error:
                errors[i] = error
        results.put({"tokens": out, "errors": errors})
    except BaseException as exc:  # noqa: BLE001 — the parent asserts on it
        results.put({"tokens": {}, "errors": {"setup": f"{type(exc).__name__}: {exc}"}})
    finally:
        stage.shutdown()


@pytest.mark.parametrize("stages", [2, 3])
def test_stage_loop_under_a_rendezvous_transport(make_checkpoint, stages):
    checkpoint = make_checkpoint("llama", vocab=128, layers=3, hidden=32)
    ctx = mp.get_context("spawn")
    ports, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_stage, args=(r, stages, str(checkpoint), ports, results), daemon=True)
             for r in range(stages)]
    for p in procs:
        p.start()
    try:
        got = results.get(timeout=180)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    assert not got["errors"], got["errors"]
    for i, prompt in enumerate(PROMPTS):
        assert got["tokens"][i] == hf_greedy(checkpoint, prompt, NEW_TOKENS), f"request {i}"
