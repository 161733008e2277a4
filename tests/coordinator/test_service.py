"""End to end: a real gRPC client → Serve's gRPC proxy → coordinators → pipeline replicas on real Ray.

Expected tokens come from transformers (`hf_greedy`), never from our own code.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.client import AsyncClient, Client, RingpipeError
from coordinator.service import Takeover
from protos.ringpipe.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from protos.ringpipe.v1 import inference_pb2 as pb
from tests.conftest import MAX_BATCH, MAX_QUEUE, REPLICAS, VOCAB
from tests.reference import hf_greedy, wait_for

PROMPTS = [(5, 17, 99, 3), (44, 8, 250, 7, 301), (1, 2, 3, 4, 5, 6), (400, 12), (77, 78, 79), (310, 9, 9, 140)]


@pytest.fixture(scope="module")
def client(service):
    with Client(service.target) as c:
        yield c


@pytest.fixture(scope="module")
def stubs(service):
    with grpc.insecure_channel(service.target) as channel:
        yield inference_pb2_grpc.InferenceStub(channel), admin_pb2_grpc.AdminStub(channel), channel


def all_slots_free(client) -> bool:
    status = client.status()
    return all(r.free_slots == r.total_slots and r.in_flight == 0 and r.queue_depth == 0 for r in status.replicas)


def test_unary_and_stream_match_transformers(client, service_checkpoint):
    for prompt in PROMPTS[:3]:
        expected = hf_greedy(service_checkpoint, prompt, 12)
        n = expected.index(2) + 1 if 2 in expected else 12  # EOS (id 2) ends greedy decoding
        done = client.generate(list(prompt), 12)
        assert done.token_ids == expected[:n]
        assert done.finish_reason == ("stop" if n < 12 else "length")
        assert done.prompt_tokens == len(prompt) and done.completion_tokens == n
        assert done.replica_id.startswith("replica-")
        assert 0 <= done.queue_ms <= done.time_to_first_token_ms

        pieces = list(client.stream(list(prompt), 12))
        ids = [t for p in pieces for t in p.token_ids]
        assert ids == expected[:n]
        offsets = [p.offset for p in pieces if p.token_ids]
        assert offsets == sorted(offsets) and offsets[0] == 0  # contiguous: checked again by the client
        assert pieces[-1].finish_reason == done.finish_reason
        assert pieces[-1].usage == {"prompt_tokens": len(prompt), "completion_tokens": n}
        assert [p.finish_reason for p in pieces[:-1]] == [None] * (len(pieces) - 1)


def test_text_prompt_and_text_deltas(client, service_checkpoint):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(service_checkpoint / "tokenizer.json"))
    prompt = "The list type is a mutable sequence"
    ids = tuple(tok.encode(prompt).ids)
    expected = hf_greedy(service_checkpoint, ids, 16)
    pieces = list(client.stream(prompt, 16, ignore_eos=True))
    got = [t for p in pieces for t in p.token_ids]
    assert got == expected
    assert "".join(p.text for p in pieces) == tok.decode(expected)
    assert client.generate(prompt, 16, ignore_eos=True).text == tok.decode(expected)


def test_stop_string_ends_generation(client, service_checkpoint):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(service_checkpoint / "tokenizer.json"))
    full = client.generate([5, 17, 99, 3], 24, ignore_eos=True)
    text = tok.decode(full.token_ids)
    stop = text[6:9]  # a piece of the greedy text: generation must end where it first appears
    cut = text.index(stop) + len(stop)
    done = client.generate([5, 17, 99, 3], 24, ignore_eos=True, stop=[stop])
    assert done.finish_reason == "stop"
    assert done.text == text[:cut]
    assert done.token_ids == full.token_ids[: len(done.token_ids)] and len(done.token_ids) < 24


def test_seeded_sampling_and_resume_continue_exactly(client):
    kwargs = dict(temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    full = client.generate([44, 8, 250], 20, **kwargs).token_ids
    assert client.generate([44, 8, 250], 20, **kwargs).token_ids == full
    assert client.generate([44, 8, 250], 20, **{**kwargs, "seed": 99}).token_ids != full
    # resume as a client whose stream broke after 7 tokens: the server continues after them
    stub = inference_pb2_grpc.InferenceStub(client._channel)
    req = pb.GenerateRequest(max_new_tokens=20, ignore_eos=True)
    req.token_ids.ids.extend([44, 8, 250])
    req.sampling.temperature, req.sampling.top_k, req.sampling.top_p, req.sampling.seed = 0.9, 50, 0.95, 1234
    req.resume.received_token_ids.extend(full[:7])
    msgs = list(stub.GenerateStream(req))
    assert msgs[0].offset == 7
    assert [t for m in msgs for t in m.token_ids] == full[7:]
    assert msgs[-1].usage.completion_tokens == 20
    unary = stub.Generate(req)
    assert list(unary.token_ids) == full  # the whole completion, resume tokens included


def _stream(stub, prompt, n, resume=(), **sampling):
    req = pb.GenerateRequest(max_new_tokens=n, ignore_eos=True)
    req.token_ids.ids.extend(prompt)
    for name, value in sampling.items():
        setattr(req.sampling, name, value)
    req.resume.received_token_ids.extend(resume)
    return list(stub.GenerateStream(req))


def test_the_server_returns_the_seed_it_picked_and_a_resume_with_it_continues_exactly(stubs):
    inference, _, _ = stubs
    msgs = _stream(inference, [44, 8, 250], 16, temperature=0.9)  # no seed: the server picks one
    assert msgs[0].HasField("seed") and not any(m.HasField("seed") for m in msgs[1:])
    seed, full = msgs[0].seed, [t for m in msgs for t in m.token_ids]
    # a raw client whose stream broke after 6 tokens resumes with the seed it was given
    rest = _stream(inference, [44, 8, 250], 16, resume=full[:6], temperature=0.9, seed=seed)
    assert [t for m in rest for t in m.token_ids] == full[6:]
    unary = pb.GenerateRequest(max_new_tokens=16, ignore_eos=True)
    unary.token_ids.ids.extend([44, 8, 250])
    unary.sampling.temperature = 0.9
    picked = inference.Generate(unary)
    assert picked.HasField("seed")
    unary.sampling.seed = picked.seed
    assert list(inference.Generate(unary).token_ids) == list(picked.token_ids)
    assert not _stream(inference, [44, 8, 250], 4)[0].HasField("seed")  # greedy needs none


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1])
def test_seeds_in_the_upper_half_of_uint64_are_served_and_resume_exactly(stubs, seed):
    inference, _, _ = stubs
    full = [t for m in _stream(inference, [5, 17, 99], 16, temperature=1.0, seed=seed) for t in m.token_ids]
    assert len(full) == 16
    assert [t for m in _stream(inference, [5, 17, 99], 16, temperature=1.0, seed=seed) for t in m.token_ids] == full
    rest = _stream(inference, [5, 17, 99], 16, resume=full[:9], temperature=1.0, seed=seed)
    assert [t for m in rest for t in m.token_ids] == full[9:]
    other = [t for m in _stream(inference, [5, 17, 99], 16, temperature=1.0, seed=seed - 2**63 + 1)
             for t in m.token_ids]
    assert other != full  # the seed's high bit is not lost on the way to the sampler


def test_a_resume_mid_character_repeats_no_text(stubs, service_checkpoint):
    """Cut a stream where its text holds back part of a character (the random model emits bytes
    that a byte-level tokenizer splits across tokens): the resumed stream's text continues after
    exactly what the client holds. Expected text: the tokenizer's decode of the whole completion."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(service_checkpoint / "tokenizer.json"))
    inference, _, _ = stubs
    kwargs = dict(temperature=1.0, seed=7)
    msgs = _stream(inference, [310, 9, 9], 48, **kwargs)
    full = [t for m in msgs for t in m.token_ids]
    assert "".join(m.text_delta for m in msgs) == tok.decode(full)
    held, cuts = "", []  # message boundaries where the client's text lacks part of its tokens' text
    for i, m in enumerate(msgs[:-1]):
        held += m.text_delta
        received = [t for x in msgs[: i + 1] for t in x.token_ids]
        if held != tok.decode(received):
            cuts.append((received, held))
    assert cuts, "no message ended mid-character: choose another seed"
    for received, held in cuts[:3]:
        rest = _stream(inference, [310, 9, 9], 48, resume=received, **kwargs)
        assert held + "".join(m.text_delta for m in rest) == tok.decode(full)


def test_sessions_stick_to_one_replica_across_coordinators(client):
    # Serve spreads calls over the 2 coordinator replicas; they must all route a session the same way
    for session in ("alice", "bob", "carol"):
        served = {client.generate([7, 8, 9], 2, session_id=session).replica_id for _ in range(8)}
        assert len(served) == 1, (session, served)
    spread = {client.generate([7, 8, 9], 1, session_id=f"s{i}").replica_id for i in range(24)}
    assert spread == {f"replica-{i}" for i in range(REPLICAS)}


def test_64_concurrent_streams_mixed_sessions(service, client, service_checkpoint):
    expected = {p: hf_greedy(service_checkpoint, p, 10) for p in PROMPTS}

    def one(i: int) -> tuple[tuple[int, ...], list[int], str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        session = f"user-{i % 5}" if i % 3 else ""
        with Client(service.target) as c:  # a channel per stream, like separate clients
            pieces = list(c.stream(list(prompt), 10, session_id=session, ignore_eos=True))
        return prompt, [t for p in pieces for t in p.token_ids], pieces[-1].finish_reason

    assert REPLICAS * (MAX_BATCH + MAX_QUEUE) >= 64  # all 64 fit: 8 generate, the rest wait for a slot
    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    for prompt, ids, reason in results:
        assert ids == expected[prompt] and reason == "length"
    wait_for(lambda: all_slots_free(client), 30, "every slot free after the streams")


def test_cancelled_stream_frees_its_slot(client):
    stream = client.stream([5, 6, 7], 480, ignore_eos=True)
    next(stream), next(stream)
    busy = client.status()
    assert sum(r.in_flight for r in busy.replicas) == 1
    stream.close()  # the client cancels the call
    wait_for(lambda: all_slots_free(client), 30, "the cancelled request's slot to be freed")


def test_deadline_stops_generation_and_frees_slot(client):
    with pytest.raises(RingpipeError) as err:
        for _ in client.stream([5, 6, 7], 480, ignore_eos=True, timeout_s=0.5):
            pass
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: all_slots_free(client), 30, "the expired request's slot to be freed")


def test_full_cluster_is_resource_exhausted_and_others_finish(service, client):
    new_tokens = 64
    capacity = REPLICAS * (MAX_BATCH + MAX_QUEUE)
    channel = grpc.insecure_channel(service.target)
    stub = inference_pb2_grpc.InferenceStub(channel)
    # long enough that no request ends before the last is sent (a batch of 4 decodes 64 steps; the
    # calls go out in milliseconds), short enough that the 64 accepted ones do not take minutes
    req = pb.GenerateRequest(max_new_tokens=new_tokens, ignore_eos=True)
    req.token_ids.ids.extend([9, 10, 11])
    calls = [stub.GenerateStream(req) for _ in range(capacity + 6)]
    outcomes = []
    for call in calls:
        try:
            outcomes.append(sum(len(m.token_ids) for m in call))
        except grpc.RpcError as exc:
            outcomes.append(exc)
    refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert refused, "some requests must be refused once every queue is full"
    assert all(o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in o.details() for o in refused)
    assert [o for o in outcomes if not isinstance(o, grpc.RpcError)] == [new_tokens] * (len(calls) - len(refused))
    channel.close()
    wait_for(lambda: all_slots_free(client), 30, "slots free after the burst")


BAD = [
    ("prompt", lambda r: r.ClearField("token_ids")),
    ("prompt.text", lambda r: setattr(r, "text", "")),
    ("prompt.token_ids", lambda r: r.token_ids.ids.append(VOCAB)),
    ("prompt", lambda r: r.token_ids.ids.extend([1] * 600)),
    ("max_new_tokens", lambda r: setattr(r, "max_new_tokens", 0)),
    ("max_new_tokens", lambda r: setattr(r, "max_new_tokens", 100_000)),
    ("sampling.temperature", lambda r: setattr(r.sampling, "temperature", -0.5)),
    ("sampling.top_p", lambda r: setattr(r.sampling, "top_p", 1.5)),
    ("sampling.top_p", lambda r: setattr(r.sampling, "top_p", 0.0)),
    ("stop_token_ids", lambda r: r.stop_token_ids.append(VOCAB + 5)),
    ("stop", lambda r: r.stop.append("")),
    ("resume.received_token_ids", lambda r: r.resume.received_token_ids.extend([1] * 9)),
    ("request", lambda r: setattr(r, "text", "x" * (2 << 20))),
]


@pytest.mark.parametrize(("field", "spoil"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_input_is_invalid_argument_naming_the_field(stubs, field, spoil):
    stub = stubs[0]
    req = pb.GenerateRequest(max_new_tokens=8)
    req.token_ids.ids.extend([5, 6, 7])
    spoil(req)
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}:"), err.value.details()


def test_bytes_that_are_no_message_are_invalid_argument(stubs):
    """Serve's proxy passes the bytes on (coordinator/servicers.py): the coordinator says they are no
    request, in the same status as any bad field (the generated handlers made this UNKNOWN in the proxy)."""
    channel = stubs[2]
    garbage = b"\x0a\xff\xff"  # field 1, length-delimited, a length that runs past the end
    calls = {  # method: (its request message, streams)
        "/ringpipe.v1.Inference/Generate": ("ringpipe.v1.GenerateRequest", False),
        "/ringpipe.v1.Inference/GenerateStream": ("ringpipe.v1.GenerateRequest", True),
        "/ringpipe.v1.Admin/ClusterStatus": ("ringpipe.v1.ClusterStatusRequest", False),
        "/grpc.health.v1.Health/Check": ("grpc.health.v1.HealthCheckRequest", False),
        "/grpc.health.v1.Health/Watch": ("grpc.health.v1.HealthCheckRequest", True),
    }
    for method, (message, streams) in calls.items():
        call = (channel.unary_stream if streams else channel.unary_unary)(method)  # no serializer: raw bytes
        with pytest.raises(grpc.RpcError) as err:
            answer = call(garbage, timeout=30)
            if streams:
                list(answer)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.code(), err.value.details())
        assert err.value.details() == f"request: the 3 bytes sent are not a valid {message} message"
    # the stubs' own messages still pass through the bytes path
    ok = stubs[0].Generate(pb.GenerateRequest(max_new_tokens=2, token_ids=pb.TokenIds(ids=[5, 6, 7])))
    assert len(ok.token_ids) >= 1


def test_bad_input_never_disturbs_a_running_stream(client, stubs, service_checkpoint):
    expected = hf_greedy(service_checkpoint, (310, 9, 9, 140), 40)
    stream = client.stream([310, 9, 9, 140], 40, ignore_eos=True)
    got = list(next(stream).token_ids)
    for _field, spoil in BAD:
        req = pb.GenerateRequest(max_new_tokens=8)
        req.token_ids.ids.extend([5, 6, 7])
        spoil(req)
        with pytest.raises(grpc.RpcError):
            stubs[0].Generate(req)
    got += [t for p in stream for t in p.token_ids]
    assert got == expected


def test_idle_health_watches_never_starve_generation(service, stubs, service_checkpoint):
    """A client opens 3,000 grpc.health.v1 Watch streams and leaves them idle (more than the two
    coordinators' 2 × 1,024 call slots), while another opens Watch streams and abandons them in a
    loop. Each coordinator holds at most `server.max_health_watches` of them; every other Watch
    ends at once (RESOURCE_EXHAUSTED from the coordinator; Serve's proxy reports part of such a
    burst of refusals as CANCELLED), none hangs, and Generate answers meanwhile with transformers'
    tokens. Once they are closed, Watch works again."""
    import asyncio
    import threading
    from collections import Counter

    from grpc import aio

    outcomes: Counter = Counter()  # "SERVING", or the status code of a Watch that ended
    stop = threading.Event()

    async def watch(stub, hold: asyncio.Event) -> None:
        call = stub.Watch(health_pb2.HealthCheckRequest())
        try:
            first = await call.read()
            outcomes[health_pb2.HealthCheckResponse.ServingStatus.Name(first.status)] += 1
            await hold.wait()
        except aio.AioRpcError as exc:
            outcomes[exc.code().name] += 1
        finally:
            call.cancel()

    async def churn(stub) -> None:
        while not stop.is_set():
            call = stub.Watch(health_pb2.HealthCheckRequest())
            try:
                await asyncio.wait_for(call.read(), 10)
            except (aio.AioRpcError, TimeoutError):
                pass
            call.cancel()

    async def main() -> None:
        channels = [aio.insecure_channel(service.target) for _ in range(12)]
        watchers = [health_pb2_grpc.HealthStub(c) for c in channels]
        hold = asyncio.Event()
        idle = [asyncio.create_task(watch(watchers[i % 10], hold)) for i in range(3000)]
        churners = [asyncio.create_task(churn(watchers[10 + i])) for i in range(2)]
        while not stop.is_set():
            await asyncio.sleep(0.1)
        hold.set()
        await asyncio.gather(*idle, *churners)
        for c in channels:
            await c.close()

    runner = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    runner.start()
    try:
        wait_for(lambda: sum(outcomes.values()) == 3000, 120, "every Watch to stream or end")
        cap = 2 * service.cfg.server.max_health_watches
        assert 0 < outcomes["SERVING"] <= cap, outcomes
        assert set(outcomes) <= {"SERVING", "RESOURCE_EXHAUSTED", "CANCELLED"}, outcomes
        assert outcomes["RESOURCE_EXHAUSTED"] > 0, outcomes
        prompt = PROMPTS[3]
        req = pb.GenerateRequest(max_new_tokens=8, ignore_eos=True)
        req.token_ids.ids.extend(prompt)
        for _ in range(3):  # generation goes on with the Watches open and the churn running
            assert list(stubs[0].Generate(req, timeout=60).token_ids) == hf_greedy(service_checkpoint, prompt, 8)
    finally:
        stop.set()
        runner.join(60)
    call = health_pb2_grpc.HealthStub(stubs[2]).Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(call).status == health_pb2.HealthCheckResponse.SERVING
    call.cancel()


def test_cluster_status_health_and_reflection(client, stubs):
    status = client.status()
    assert status.epoch >= REPLICAS
    assert sorted(r.replica_id for r in status.replicas) == [f"replica-{i}" for i in range(REPLICAS)]
    assert abs(sum(r.ring_share for r in status.replicas) - 1) < 1e-9
    for r in status.replicas:
        assert r.state == admin_pb2.REPLICA_STATE_SERVING and r.total_slots == MAX_BATCH
        assert [s.index for s in r.stages] == [0, 1]
        assert r.stages[0].layer_start == 0 and r.stages[0].layer_end == r.stages[1].layer_start
        assert all(s.address.startswith("127.") and s.node_id for s in r.stages)
    health = health_pb2_grpc.HealthStub(stubs[2])
    for name in ("", "ringpipe.v1.Inference"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflect = reflection_pb2_grpc.ServerReflectionStub(stubs[2])
    answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"ringpipe.v1.Inference", "ringpipe.v1.Admin", "grpc.health.v1.Health"} <= names


def test_prefix_reuse_gives_identical_multi_turn_output(client, service_checkpoint):
    def reused(replica_id: str) -> int:
        return next(r for r in client.status().replicas if r.replica_id == replica_id).reused_tokens

    turn1 = (12, 34, 56, 78, 90, 123)
    out1 = client.generate(list(turn1), 8, session_id="chat-1", ignore_eos=True)
    before = reused(out1.replica_id)
    turn2 = turn1 + tuple(out1.token_ids) + (200, 201)
    out2 = client.generate(list(turn2), 8, session_id="chat-1", ignore_eos=True)
    assert out1.token_ids == hf_greedy(service_checkpoint, turn1, 8)
    assert out2.token_ids == hf_greedy(service_checkpoint, turn2, 8)
    assert out2.replica_id == out1.replica_id
    # turn 1 fed the model its prompt and every sampled token but the last (whose KV nobody needed):
    # turn 2 starts with all of those, so that many of its prompt tokens are not prefilled again
    assert reused(out1.replica_id) - before == len(turn1) + len(out1.token_ids) - 1


def test_async_client(service, service_checkpoint):
    import asyncio

    async def main() -> tuple[list[int], list[int]]:
        async with AsyncClient(service.target) as c:
            done = await c.generate([5, 17, 99, 3], 10, ignore_eos=True)
            streamed = [t async for p in c.stream([5, 17, 99, 3], 10, ignore_eos=True) for t in p.token_ids]
            return done.token_ids, streamed

    unary, streamed = asyncio.run(main())
    assert unary == streamed == hf_greedy(service_checkpoint, (5, 17, 99, 3), 10)


def _deploy(service, name: str, **changes):
    from ray import serve

    from cluster.serve import coordinator_settings
    from coordinator.app import build_app

    settings = dataclasses.replace(coordinator_settings(service.cfg), **changes)
    serve.run(build_app(settings, 1), name=name, route_prefix=f"/{name}")
    return (("application", name),)


def _openai_at(service, app: str, api_key: str = "unused"):
    """The official OpenAI client on the OpenAI API of the Serve app `app` (deployed by `_deploy`)."""
    import openai

    base_url = service.openai_base_url.removesuffix("/v1") + f"/{app}/v1"
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)


def test_bearer_token_auth_and_the_http_deadline(service, stubs):
    """Both fronts: the token is required and checked; over HTTP, server.request_timeout_s is a 504."""
    import openai
    from ray import serve

    app = _deploy(service, "authed", auth_token="s3cret", request_timeout_s=0.2)
    try:
        req = pb.GenerateRequest(max_new_tokens=3)
        req.token_ids.ids.extend([5, 6, 7])
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            with pytest.raises(grpc.RpcError) as err:
                stubs[0].Generate(req, metadata=app + metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                stubs[1].ClusterStatus(admin_pb2.ClusterStatusRequest(), metadata=app + metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = app + (("authorization", "Bearer s3cret"),)
        assert len(stubs[0].Generate(req, metadata=good).token_ids) >= 1
        assert len(stubs[1].ClusterStatus(admin_pb2.ClusterStatusRequest(), metadata=good).replicas) == REPLICAS
        for key in ("unused", "wrong"):
            with pytest.raises(openai.AuthenticationError) as err:
                _openai_at(service, "authed", api_key=key).models.list()
            assert err.value.response.json()["error"]["code"] == "invalid_api_key"
        api = _openai_at(service, "authed", api_key="s3cret")
        model = service.cfg.model.served_name
        assert [m.id for m in api.models.list()] == [model]
        with pytest.raises(openai.APIStatusError) as err:  # 480 tokens take far longer than 0.2 s, anywhere
            api.completions.create(model=model, prompt=[5, 6, 7], max_tokens=480, temperature=0)
        assert err.value.status_code == 504
        assert "server.request_timeout_s" in err.value.response.json()["error"]["message"]
    finally:
        serve.delete("authed")


def test_no_live_replica_is_unavailable(service, stubs, ray_cluster):
    """UNAVAILABLE over gRPC, 503 over HTTP, once takeover.wait_s has passed with nobody to take it."""
    import openai
    from ray import serve

    from failover.controller import NAMESPACE, Controller, ControllerSettings

    # a controller whose replicas never started: its membership is empty
    empty = Controller.options(name="empty-controller", namespace=NAMESPACE).remote(
        service.cfg.replica_spec(), ControllerSettings(replicas=1), "empty-controller"
    )
    # a request waits `takeover.wait_s` for a replica to appear (a rebuild on its way), then gives up
    takeover = dataclasses.replace(Takeover(), wait_s=1.0)
    app = _deploy(service, "empty", controller="empty-controller", takeover=takeover)
    try:
        req = pb.GenerateRequest(max_new_tokens=3)
        req.token_ids.ids.extend([5, 6, 7])
        with pytest.raises(grpc.RpcError) as err:
            stubs[0].Generate(req, metadata=app)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no live pipeline replica" in err.value.details() and "failover.takeover.wait_s" in err.value.details()
        health = health_pb2_grpc.HealthStub(stubs[2])
        status = health.Check(health_pb2.HealthCheckRequest(), metadata=app).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(openai.APIStatusError) as err:
            _openai_at(service, "empty").completions.create(model=service.cfg.model.served_name, prompt=[5, 6, 7],
                                                            max_tokens=3)
        assert err.value.status_code == 503
        assert "no live pipeline replica" in err.value.response.json()["error"]["message"]
    finally:
        serve.delete("empty")
        ray_cluster.kill(empty)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_cli_generate_and_status(service, service_checkpoint):
    expected = hf_greedy(service_checkpoint, (5, 17, 99, 3), 6)
    for extra in ((), ("--stream",)):
        out = _cli("generate", "--prompt-ids", "5,17,99,3", "--max-new-tokens", "6", "--target", service.target,
                   "--json", *extra)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        n = expected.index(2) + 1 if 2 in expected else 6
        assert result["token_ids"] == expected[:n]
    bad = _cli("generate", "--prompt-ids", "5", "--max-new-tokens", "0", "--target", service.target, "--json")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "max_new_tokens" in bad.stderr
    status = _cli("status", "--target", service.target, "--json")
    assert status.returncode == 0, status.stderr
    answer = json.loads(status.stdout.strip().splitlines()[-1])
    replicas = answer["replicas"]
    assert answer["dtype"] == "float32"  # the session service's model.dtype (the default)
    assert len(replicas) == REPLICAS and all(r["state"] == "serving" for r in replicas)
    down = _cli("status", "--target", "127.0.0.1:1")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
