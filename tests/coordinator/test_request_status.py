"""Each generation request is counted once, at its end, by the gRPC status it ends with
(`ray_ringpipe_requests_total{status}`): answered, refused at admission, failed, or cancelled by the
client. The coordinator is built without Ray: its generation is a fake, the counter a list.
(Exported and scraped for real: tests/cluster/test_chaos.py.)"""

from __future__ import annotations

import asyncio

import pytest

import coordinator.service as service
from coordinator.errors import NoReplica
from coordinator.request import Limits
from coordinator.service import Chunk, Coordinator, CoordinatorSettings
from protos.ringpipe.v1 import inference_pb2 as pb


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    statuses: list[str] = []
    monkeypatch.setattr(service, "count_request", statuses.append)
    return statuses


def coordinator(generate=None, auth_token: str | None = None) -> Coordinator:
    c = Coordinator.__new__(Coordinator)  # no controller, no model: only what admission and `run` read
    c.settings = CoordinatorSettings(model_dir="", max_seq_len=64, max_new_tokens=8, auth_token=auth_token)
    c.limits = Limits(vocab_size=16, max_seq_len=64, max_new_tokens=8, max_request_bytes=1 << 20)
    c.tokenizer = None
    if generate is not None:
        c._generate = generate
    return c


def chunk(n: int, reason: str | None = None) -> Chunk:
    return Chunk([n], "", n, "replica-0", 1, reason)


async def drain(c: Coordinator) -> list[Chunk]:
    return [x async for x in c.run(None)]


def test_an_answered_request_counts_once_as_ok(counted):
    async def generate(job):
        yield chunk(0)
        yield chunk(1, "length")

    assert len(asyncio.run(drain(coordinator(generate)))) == 2
    assert counted == ["OK"]


def test_a_failed_request_counts_as_its_status(counted):
    async def generate(job):
        yield chunk(0)
        raise NoReplica("no live pipeline replica is on the ring")

    with pytest.raises(NoReplica):
        asyncio.run(drain(coordinator(generate)))
    assert counted == ["UNAVAILABLE"]


def test_a_client_gone_counts_as_cancelled_and_closes_the_generation(counted):
    closed = []

    async def generate(job):
        try:
            yield chunk(0)
            await asyncio.sleep(3600)  # a replica that has not answered yet
            yield chunk(1, "length")
        finally:
            closed.append(True)  # where the replica stream is cancelled

    async def stop_reading():  # a caller that stops after the first chunk (GeneratorExit)
        stream = coordinator(generate).run(None)
        await anext(stream)
        await stream.aclose()

    async def cancel_waiting():  # a client that cancels, or whose deadline passed, while it waits
        task = asyncio.ensure_future(drain(coordinator(generate)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(stop_reading())
    asyncio.run(cancel_waiting())
    assert counted == ["CANCELLED", "CANCELLED"] and closed == [True, True]


def test_a_request_refused_at_admission_counts_as_its_status(counted):
    bad = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[99]), max_new_tokens=4)  # outside the vocabulary
    with pytest.raises(Exception, match="vocabulary"):
        coordinator()._admit(bad, None)
    good = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), max_new_tokens=4)
    with pytest.raises(Exception, match="authorization"):
        coordinator(auth_token="secret")._admit(good, None)
    assert coordinator()._admit(good, None).prompt == (1, 2)  # admitted: counted at its end, by `run`
    assert counted == ["INVALID_ARGUMENT", "UNAUTHENTICATED"]
