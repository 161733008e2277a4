"""Pure parts of the coordinator and the client: incremental text, resume bookkeeping."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.client import RingpipeError, _Resumable, build_request
from coordinator.text import IncrementalText
from protos.ringpipe.v1 import inference_pb2 as pb
from shards.checkpoint import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(make_checkpoint):
    return load_tokenizer(make_checkpoint("llama", tokenizer=True, vocab=512))


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=80), cut=st.integers(1, 4))
def test_deltas_join_to_the_whole_decode(tokenizer, text, cut):
    ids = tokenizer.encode(text).ids
    inc = IncrementalText(tokenizer)
    parts = [inc.push(ids[i : i + cut]) for i in range(0, len(ids), cut)]
    parts.append(inc.flush())
    assert "".join(parts) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in parts) or "\ufffd" in text


# characters of 1 to 4 UTF-8 bytes: a byte-level tokenizer splits the longer ones across tokens
SPLIT_CHARS = st.text(alphabet=st.sampled_from(list("ab cd.é€中文字😀🎉")), min_size=1, max_size=40)


def _chunks(ids: list[int], sizes: list[int]) -> list[list[int]]:
    out, i = [], 0
    for k in sizes:
        if i >= len(ids):
            break
        out.append(ids[i : i + k])
        i += k
    return [*out, ids[i:]] if i < len(ids) else out


@settings(max_examples=150, deadline=None)
@given(text=SPLIT_CHARS, sizes=st.lists(st.integers(1, 4), max_size=60), data=st.data())
def test_a_resume_continues_after_exactly_the_text_the_client_holds(tokenizer, text, sizes, data):
    """A stream delivers tokens in chunks and breaks after `cut` tokens; the client holds the text
    deltas it got. The resumed stream (as the service runs it: the received tokens pushed and their
    delta dropped) delivers the rest. Together: the whole decode, nothing repeated or lost."""
    ids = tokenizer.encode(text).ids
    cut = data.draw(st.integers(0, len(ids)), label="cut")
    first = IncrementalText(tokenizer)
    held = "".join(first.push(c) for c in _chunks(ids[:cut], sizes))
    resumed = IncrementalText(tokenizer)
    resumed.push(ids[:cut])
    rest = "".join(resumed.push(c) for c in _chunks(ids[cut:], sizes[::-1])) + resumed.flush()
    assert held + rest == tokenizer.decode(ids)


def test_a_client_holding_ab_of_ab_euro_cd_gets_euro_cd(tokenizer):
    ids = tokenizer.encode("ab€cd").ids
    # the cut: inside the euro sign (its three bytes span more than one token here)
    cut = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd"))
    first = IncrementalText(tokenizer)
    held = first.push(ids[: cut - 1]) + first.push(ids[cut - 1 : cut])  # the last chunk ends mid-character
    assert held == "ab"
    resumed = IncrementalText(tokenizer)
    resumed.push(ids[:cut])
    assert resumed.push(ids[cut:]) + resumed.flush() == "€cd"


def test_stop_string_cuts_text_after_its_first_match(tokenizer):
    ids = tokenizer.encode("return the list of values").ids
    inc = IncrementalText(tokenizer, stops=["list", "of"])
    out = "".join(inc.push([t]) for t in ids)
    assert out == "return the list" and inc.stopped


def test_resume_bookkeeping_drops_repeats_and_refuses_gaps():
    state = _Resumable(build_request([1, 2, 3], 10))
    first = state.accept(pb.GenerateStreamResponse(token_ids=[7, 8], offset=0))
    assert first.token_ids == [7, 8]
    resend = state.next_request()
    assert list(resend.resume.received_token_ids) == [7, 8]
    # a server that repeats tokens already received: only the new one reaches the caller
    again = state.accept(pb.GenerateStreamResponse(token_ids=[8, 9], offset=1))
    assert again.token_ids == [9] and again.offset == 2
    assert state.accept(pb.GenerateStreamResponse(token_ids=[9], offset=2)) is None
    with pytest.raises(RingpipeError) as err:
        state.accept(pb.GenerateStreamResponse(token_ids=[11], offset=5))
    assert err.value.code == grpc.StatusCode.DATA_LOSS


def test_sampling_without_seed_gets_one_for_resume():
    sampled = build_request("hi", 5, temperature=0.7)
    assert sampled.sampling.HasField("seed")
    assert not build_request("hi", 5).sampling.HasField("seed")  # greedy needs none
    assert build_request("hi", 5, temperature=0.7, seed=3).sampling.seed == 3


@pytest.mark.parametrize(
    ("code", "details", "retry"),
    [
        (grpc.StatusCode.UNAVAILABLE, "no live pipeline replica is on the ring", True),
        # what Serve's proxy says when the coordinator replica of the call is lost (measured)
        (grpc.StatusCode.INTERNAL, "The actor died unexpectedly before finishing this task.", True),
        (grpc.StatusCode.INTERNAL, "The actor 4a1f is unavailable: The actor is temporarily unavailable: "
         "RpcError: RPC error: Socket closed rpc_code: 14.", True),
        (grpc.StatusCode.INTERNAL, "ValueError: bad", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens: must be at least 1", False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "every replica is busy", False),
    ],
)
def test_which_failures_the_client_resends(code, details, retry):
    from coordinator.client import _retryable

    class Failure(grpc.RpcError):
        def code(self):
            return code

        def details(self):
            return details

    assert _retryable(Failure()) is retry
