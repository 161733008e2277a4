"""The head's scheduler as a pure core: batching decisions checked against a simulated pipeline."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.errors import RequestError
from shards.sampling import SamplingParams
from shards.scheduler import GenerationRequest, Scheduler


def request(rid: str, prompt_len: int, new: int, stops: frozenset[int] = frozenset()) -> GenerationRequest:
    return GenerationRequest(rid, tuple(range(1, prompt_len + 1)), new, stop_token_ids=stops)


def fake_token(rid: str, position: int) -> int:
    """A stand-in model: the token depends only on the request and the position."""
    return (hash((rid, position)) % 97) + 3


def check_packing(sched: Scheduler, mb) -> None:
    """What every micro-batch must be: its rows' tokens laid end to end, each request once,
    at most `prefill_chunk` prompt tokens beside decode steps (`max_prefill_tokens` with none), and only
    the row that ends a prompt or decodes samples."""
    rows = mb.header.rows
    assert len(mb.input_ids) == mb.header.tokens == sum(r.length for r in rows)
    assert len(set(mb.request_ids)) == len(mb.request_ids) == len(rows) <= sched.n_slots
    prompt_len = [len(sched.running[rid].request.prompt) for rid in mb.request_ids]
    decoding = any(r.start >= n for r, n in zip(rows, prompt_len, strict=True))
    budget = sched.prefill_chunk if decoding else max(sched.prefill_chunk, sched.max_prefill_tokens)
    assert sum(r.length for r, n in zip(rows, prompt_len, strict=True) if r.start < n) <= budget
    at = 0
    for rid, r in zip(mb.request_ids, rows, strict=True):
        seq = sched.running[rid]
        assert mb.input_ids[at : at + r.length] == seq.tokens[r.start : r.start + r.length]
        assert r.position == r.start + r.length
        assert r.sample == (r.start + r.length >= len(seq.request.prompt))
        at += r.length


def drive(sched: Scheduler, arrivals: dict[int, list[GenerationRequest]], max_steps: int = 10_000):
    """Run the scheduler against a FIFO pipeline of depth n_stages; returns tokens per request."""
    out: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    pipeline = []
    max_in_flight = 0
    for step in range(max_steps):
        for req in arrivals.get(step, []):
            sched.submit(req)
        while (mb := sched.next_microbatch()) is not None:
            check_packing(sched, mb)
            pipeline.append(mb)
        max_in_flight = max(max_in_flight, len(pipeline))
        if not pipeline:
            if sched.idle and step > max(arrivals, default=0):
                return out, reasons, max_in_flight
            continue
        mb = pipeline.pop(0)
        tokens = [fake_token(rid, row.position) for rid, row in zip(mb.request_ids, mb.header.rows, strict=True) if row.sample]
        for ev in sched.on_result(mb.mb_id, tokens):
            out.setdefault(ev.request_id, []).append(ev.token)
            if ev.finish_reason:
                reasons[ev.request_id] = ev.finish_reason
    raise AssertionError("scheduler did not drain")


@settings(max_examples=60, deadline=None)
@given(
    n_slots=st.integers(1, 6),
    n_stages=st.integers(1, 4),
    chunk=st.integers(1, 8),
    max_prefill=st.sampled_from([0, 5, 40]),
    reqs=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 12), st.integers(0, 30)), min_size=1, max_size=10),
)
def test_every_request_gets_exactly_its_tokens(n_slots, n_stages, chunk, max_prefill, reqs):
    sched = Scheduler(n_slots, 64, chunk, n_stages, vocab_size=1000, max_prefill_tokens=max_prefill)
    arrivals: dict[int, list[GenerationRequest]] = {}
    for i, (plen, new, at) in enumerate(reqs):
        arrivals.setdefault(at, []).append(request(f"r{i}", plen, new))
    out, reasons, max_in_flight = drive(sched, arrivals)
    for i, (plen, new, _) in enumerate(reqs):
        rid = f"r{i}"
        assert out[rid] == [fake_token(rid, plen + k) for k in range(new)]  # brute force: position plen+k
        assert reasons[rid] == "length"
    assert max_in_flight <= n_stages
    assert sched.slots.free == n_slots and sched.idle


def test_decode_fills_every_stage():
    """In steady state S micro-batches are in flight, each carrying 1/S of the decoding sequences."""
    sched = Scheduler(8, 2048, 16, 2, vocab_size=100)
    for i in range(8):
        sched.submit(request(f"r{i}", 3 + i, 1000))
    pipeline, decode_sizes, depth = [], [], []
    for _ in range(200):
        while (mb := sched.next_microbatch()) is not None:
            pipeline.append(mb)
            if mb.header.tokens == len(mb.header.rows):  # decode steps only
                decode_sizes.append(len(mb.header.rows))
        depth.append(len(pipeline))
        mb = pipeline.pop(0)
        sched.on_result(mb.mb_id, [7] * sum(r.sample for r in mb.header.rows))
    assert decode_sizes[-20:] == [4] * 20
    assert depth[-20:] == [2] * 20


def test_prompt_is_chunked():
    sched = Scheduler(2, 64, 4, 1, vocab_size=100)
    sched.submit(request("a", 10, 1))
    sizes = []
    while (mb := sched.next_microbatch()) is not None:
        sizes.append(mb.header.tokens)
        assert [r.sample for r in mb.header.rows] == [sum(sizes) == 10]
        sched.on_result(mb.mb_id, [5] if sum(sizes) == 10 else [])
    assert sizes == [4, 4, 2]


def test_prompts_are_packed_into_one_microbatch():
    """Waiting prompts share a micro-batch up to the token budget; the one that does not fit is split."""
    sched = Scheduler(4, 64, 12, 1, vocab_size=100)
    for i in range(4):
        sched.submit(request(f"r{i}", 5, 2))
    mb = sched.next_microbatch()
    check_packing(sched, mb)
    assert mb.request_ids == ("r0", "r1", "r2") and [r.length for r in mb.header.rows] == [5, 5, 2]
    assert [r.sample for r in mb.header.rows] == [True, True, False]


def test_prompts_arriving_together_are_prefilled_at_once_until_one_decodes():
    """With nothing generating, no stream waits on the step: the prompts go through up to
    `max_prefill_tokens` at once. Beside a decoding sequence the smaller `prefill_chunk` applies."""
    sched = Scheduler(8, 64, 6, 1, vocab_size=100, max_prefill_tokens=100)
    for i in range(4):
        sched.submit(request(f"r{i}", 10, 3))
    mb = sched.next_microbatch()
    check_packing(sched, mb)
    assert [r.length for r in mb.header.rows] == [10] * 4  # 40 tokens in one forward, not 6 at a time
    sched.on_result(mb.mb_id, [7] * 4)
    sched.submit(request("late", 10, 3))
    mb = sched.next_microbatch()
    check_packing(sched, mb)
    assert [(rid, r.length) for rid, r in zip(mb.request_ids, mb.header.rows, strict=True)] == [
        ("r0", 1), ("r1", 1), ("r2", 1), ("r3", 1), ("late", 6)]


def test_decode_goes_on_while_a_long_prompt_is_prefilled():
    """A prompt of many chunks rides beside the decode steps of a running sequence: every
    micro-batch gives the decoding sequence a token."""
    sched = Scheduler(2, 256, 16, 1, vocab_size=1000)
    sched.submit(request("short", 3, 50))
    mb = sched.next_microbatch()
    sched.on_result(mb.mb_id, [7])
    sched.submit(request("long", 100, 1))
    shapes = []
    while "long" in sched.running or sched.waiting:
        mb = sched.next_microbatch()
        check_packing(sched, mb)
        shapes.append([(rid, r.length) for rid, r in zip(mb.request_ids, mb.header.rows, strict=True)])
        sched.on_result(mb.mb_id, [7] * sum(r.sample for r in mb.header.rows))
    assert shapes == [[("short", 1), ("long", 16)]] * 6 + [[("short", 1), ("long", 4)]]


def test_stop_token_and_slot_release():
    sched = Scheduler(1, 64, 8, 1, vocab_size=100)
    sched.submit(request("a", 2, 10, stops=frozenset({9})))
    sched.submit(request("b", 2, 1))
    mb = sched.next_microbatch()
    assert mb.request_ids == ("a",)  # b waits: one slot
    (ev,) = sched.on_result(mb.mb_id, [9])
    assert ev.finish_reason == "stop" and sched.slots.free == 1  # freed at once
    mb = sched.next_microbatch()
    assert mb.request_ids == ("b",)  # a's slot went straight to b


def test_cancel_frees_slot_and_drops_late_tokens():
    sched = Scheduler(1, 64, 8, 2, vocab_size=100)
    sched.submit(request("a", 2, 10))
    mb = sched.next_microbatch()
    assert sched.cancel("a").finish_reason == "cancelled"
    assert sched.slots.free == 1
    assert sched.on_result(mb.mb_id, [4]) == []  # the in-flight result for a is dropped
    assert sched.cancel("missing") is None


@pytest.mark.parametrize(
    "req,field",
    [
        (GenerationRequest("x", (), 4), "prompt"),
        (GenerationRequest("x", tuple(range(64)), 4), "prompt"),
        (GenerationRequest("x", (1, 100), 4), "prompt"),
        (GenerationRequest("x", (1,), 0), "max_new_tokens"),
        (GenerationRequest("x", (1,), 4, SamplingParams(temperature=-0.5)), "temperature"),
        (GenerationRequest("x", (1,), 4, SamplingParams(temperature=float("nan"))), "temperature"),
        (GenerationRequest("x", (1,), 4, SamplingParams(temperature=1.0, top_p=0.0)), "top_p"),
        (GenerationRequest("x", (1,), 4, SamplingParams(temperature=1.0, top_p=1.5)), "top_p"),
        (GenerationRequest("x", (1,), 4, SamplingParams(temperature=1.0, top_k=-1)), "top_k"),
        (GenerationRequest("x", (1,), 4, SamplingParams(temperature=1.0, seed=2**64)), "seed"),  # past uint64
    ],
)
def test_bad_requests_name_the_field(req, field):
    sched = Scheduler(2, 64, 8, 1, vocab_size=100)
    with pytest.raises(RequestError) as err:
        sched.submit(req)
    assert err.value.field == field


def test_context_limit_ends_with_length():
    sched = Scheduler(1, 8, 8, 1, vocab_size=100)
    sched.submit(request("a", 5, 100))
    out, reasons, _ = drive(sched, {})
    assert len(out["a"]) == 3 and reasons["a"] == "length"  # 5 + 3 = max_seq_len


def test_random_cancellations_never_leak_slots():
    rng = random.Random(0)
    sched = Scheduler(3, 64, 4, 2, vocab_size=100)
    live = set()
    for step in range(400):
        if rng.random() < 0.3:
            rid = f"r{step}"
            sched.submit(request(rid, rng.randint(1, 9), rng.randint(1, 9)))
            live.add(rid)
        if live and rng.random() < 0.1:
            sched.cancel(rng.choice(sorted(live)))
        while (mb := sched.next_microbatch()) is not None:
            sched.on_result(mb.mb_id, [5] * sum(r.sample for r in mb.header.rows))
        live &= set(sched.running) | {r.request_id for r in sched.waiting}
    while not sched.idle:
        mb = sched.next_microbatch()
        sched.on_result(mb.mb_id, [5] * sum(r.sample for r in mb.header.rows))
    assert sched.slots.free == 3


def test_duplicate_request_id_is_refused():
    sched = Scheduler(2, 64, 8, 1, vocab_size=100)
    sched.submit(request("a", 2, 3))
    with pytest.raises(RequestError) as err:
        sched.submit(request("a", 2, 3))
    assert err.value.field == "request_id"


@settings(max_examples=40, deadline=None)
@given(
    n_slots=st.integers(1, 4),
    n_stages=st.integers(1, 3),
    reqs=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 8), st.integers(0, 20)), min_size=1, max_size=8),
)
def test_prefix_cache_keeps_tokens_and_slots(n_slots, n_stages, reqs):
    """With prefix reuse the same tokens come out and every slot is reusable at the end."""
    sched = Scheduler(n_slots, 64, 4, n_stages, vocab_size=1000, prefix_cache=True)
    arrivals: dict[int, list[GenerationRequest]] = {}
    for i, (plen, new, at) in enumerate(reqs):
        arrivals.setdefault(at, []).append(request(f"r{i}", plen, new))  # prompts share prefixes 1..n
    out, reasons, _ = drive(sched, arrivals)
    for i, (plen, new, _) in enumerate(reqs):
        assert out[f"r{i}"] == [fake_token(f"r{i}", plen + k) for k in range(new)]
    assert sched.free_slots == n_slots


def test_prefix_reuse_skips_the_shared_prefix():
    sched = Scheduler(2, 64, 100, 1, vocab_size=100, prefix_cache=True)
    sched.submit(request("a", 6, 3))  # prompt 1..6, then 3 tokens
    out, _, _ = drive(sched, {})
    first = [1, 2, 3, 4, 5, 6, *out["a"]]
    follow_up = GenerationRequest("b", tuple(first + [40, 41]), 2)
    sched.submit(follow_up)
    mb = sched.next_microbatch()
    # everything fed to "a" (all but its last sampled token) is reused
    assert mb.header.rows[0].start == len(first) - 1
    assert mb.input_ids == first[-1:] + [40, 41]
    assert sched.reused_tokens == len(first) - 1
