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
