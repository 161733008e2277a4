"""`pipeline.batch_window_ms`: an idle head waits for more prompts to prefill them in one forward.
No Ray: `Stage` is plain Python, one stage here, counting its forwards (`stats()["steps"]`)."""

from __future__ import annotations

import queue
import time

import pytest

from shards.scheduler import GenerationRequest, Scheduler
from tests.reference import hf_greedy
from tests.shards.one_stage import started_stage


def run_spaced(model_dir, window_ms: float, prompts: list[tuple[int, ...]], gap_s: float) -> tuple[int, dict]:
    """Submit `prompts` `gap_s` apart (one new token each); the forwards it took and the tokens."""
    stage = started_stage(model_dir, "window", batch_window_ms=window_ms)
    events: queue.Queue = queue.Queue()
    try:
        for i, prompt in enumerate(prompts):
            stage.submit(GenerationRequest(f"r{i}", prompt, 1), lambda ev, i=i: events.put((f"r{i}", ev)))
            time.sleep(gap_s)
        tokens = {}
        while len(tokens) < len(prompts):
            rid, ev = events.get(timeout=60)
            assert not isinstance(ev, BaseException), ev
            tokens[rid] = ev.token
        return stage.stats()["steps"], tokens
    finally:
        stage.shutdown()


@pytest.mark.parametrize("window_ms", [0, 2000])
def test_a_window_prefills_prompts_that_arrive_apart_together(make_checkpoint, window_ms: float) -> None:
    model_dir = make_checkpoint("llama", vocab=128, layers=2, hidden=32)
    prompts = [(3, 4, 5), (10, 11), (20, 21, 22, 23)]
    steps, tokens = run_spaced(model_dir, window_ms, prompts, gap_s=0.3)
    assert tokens == {f"r{i}": hf_greedy(model_dir, p, 1)[0] for i, p in enumerate(prompts)}
    # without a window each prompt, arriving after the last one's forward is long done, has its own;
    # with one, the head holds the first until the window ends (or the batch fills) and runs one
    assert steps == (1 if window_ms else len(prompts))


def test_the_window_closes_early_when_the_batch_is_full() -> None:
    sched = Scheduler(n_slots=2, max_seq_len=64, prefill_chunk=8, n_stages=1, vocab_size=100)
    assert sched.gather_until(0.5) is None  # nothing waiting
    before = time.monotonic()
    sched.submit(GenerationRequest("a", (1, 2, 3), 2))
    deadline = sched.gather_until(0.5)
    assert deadline is not None and before + 0.5 <= deadline <= time.monotonic() + 0.5
    assert sched.gather_until(0) is None  # no window: go at once
    sched.submit(GenerationRequest("b", (1, 2), 2))
    assert sched.gather_until(0.5) is None  # every free slot has a prompt
    sched = Scheduler(n_slots=4, max_seq_len=64, prefill_chunk=4, n_stages=1, vocab_size=100)
    sched.submit(GenerationRequest("a", (1, 2, 3, 4, 5), 2))
    assert sched.gather_until(0.5) is None  # the prompt alone fills a micro-batch's prompt budget
