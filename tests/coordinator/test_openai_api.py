"""The OpenAI HTTP API end to end: the official `openai` client (and plain httpx for the wire format)
→ Serve's HTTP proxy → coordinators → pipeline replicas on real Ray.

Expected text is the gRPC front's answer to the same greedy request, whose tokens are checked
against transformers (`hf_greedy`) in the same test; chat prompts are rendered by transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import httpx2 as httpx  # what the openai package speaks HTTP with
import openai
import pytest

from coordinator.client import Client
from protos.ringpipe.v1 import inference_pb2 as pb
from protos.ringpipe.v1 import inference_pb2_grpc
from tests.conftest import MAX_BATCH, MAX_QUEUE, REPLICAS
from tests.coordinator.test_service import all_slots_free
from tests.reference import hf_greedy, wait_for

PROMPT = [5, 17, 99, 3]
EOS = 2


@pytest.fixture(scope="module")
def grpc_client(service):
    with Client(service.target) as c:
        yield c


@pytest.fixture(scope="module")
def model(service):
    return Path(service.cfg.model.directory).resolve().name


def _openai(base_url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=120, **kw)


def _until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def _greedy_grpc(grpc_client, checkpoint, prompt: list[int], n: int):
    """The gRPC answer to a greedy request, its tokens checked against transformers."""
    answer = grpc_client.generate(prompt, n)
    assert list(answer.token_ids) == _until_eos(hf_greedy(checkpoint, tuple(prompt), n))
    return answer


def _sse(base_url: str, path: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed answer, as sent."""
    with httpx.Client(timeout=120) as http, http.stream("POST", base_url + path, json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_models_and_greedy_completions_match_grpc(service, service_checkpoint, grpc_client, model):
    api = _openai(service.openai_base_url)
    assert [m.id for m in api.models.list()] == [model]
    n = 12
    expected = _greedy_grpc(grpc_client, service_checkpoint, PROMPT, n)
    answer = api.completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0)
    assert answer.object == "text_completion" and answer.model == model
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == ("stop" if expected.token_ids[-1] == EOS else "length")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(PROMPT), len(expected.token_ids))
    text = api.completions.create(model=model, prompt="The list type", max_tokens=n, temperature=0)
    assert text.choices[0].text == grpc_client.generate("The list type", n).text

    events = _sse(service.openai_base_url, "/completions", {
        "model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected.text
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == answer.choices[0].finish_reason
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(expected.token_ids)
    streamed = api.completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_chat_renders_the_template_and_matches_grpc(service, service_checkpoint, grpc_client, model):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "What is a list?"}]
    ids = AutoTokenizer.from_pretrained(str(service_checkpoint)).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
    n = 10
    expected = _greedy_grpc(grpc_client, service_checkpoint, ids, n)
    api = _openai(service.openai_base_url)
    answer = api.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0)
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens == len(ids)
    chunks = list(api.chat.completions.create(model=model, messages=messages, max_completion_tokens=n, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    # the session header routes like gRPC's session_id: a conversation stays on one replica
    seeded = [api.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0.8, seed=7,
                                          extra_headers={"X-Session-Id": "conversation-1"}).choices[0].message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # the same seed draws the same tokens wherever they run


def _error(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


def test_errors_are_openai_shaped_with_their_status(service, model):
    api = _openai(service.openai_base_url)
    cases = [
        (dict(model=model, prompt=PROMPT, max_tokens=0), openai.BadRequestError, "max_tokens"),
        (dict(model=model, prompt=PROMPT, n=2), openai.BadRequestError, "n"),
        (dict(model=model, prompt=PROMPT, logprobs=2), openai.BadRequestError, "logprobs"),
        (dict(model="gpt-4o", prompt=PROMPT), openai.NotFoundError, "model"),
    ]
    for kwargs, kind, param in cases:
        with pytest.raises(kind) as err:
            api.completions.create(**kwargs)
        assert _error(err.value)["param"] == param and _error(err.value)["message"]
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                    tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert _error(err.value)["param"] == "tools" and _error(err.value)["type"] == "invalid_request_error"
    with httpx.Client(base_url=service.openai_base_url, timeout=30) as http:
        broken = http.post("/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 400 and broken.json()["error"]["param"] == "body"
        assert http.get("/completions").status_code == 405
        huge = http.post("/completions", json={"model": model, "prompt": "x" * (2 << 20)})
        assert huge.status_code == 413 and huge.json()["error"]["param"] == "body"
        assert http.get("/nothing").status_code == 404 and "error" in http.get("/nothing").json()
        # a bad request does not cost the next one anything
        assert http.post("/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_a_full_cluster_is_429(service, grpc_client, model):
    """Every slot and queue place taken by long gRPC streams: an HTTP request is refused at once."""
    with grpc.insecure_channel(service.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        req = pb.GenerateRequest(max_new_tokens=480, ignore_eos=True)
        req.token_ids.ids.extend([9, 10, 11])
        calls = [stub.GenerateStream(req) for _ in range(REPLICAS * (MAX_BATCH + MAX_QUEUE))]
        try:
            def full() -> bool:
                return all(r.in_flight == MAX_BATCH and r.queue_depth == MAX_QUEUE
                           for r in grpc_client.status().replicas)

            wait_for(full, 60, "every slot and queue place taken")
            with pytest.raises(openai.RateLimitError) as err:
                _openai(service.openai_base_url).completions.create(model=model, prompt=PROMPT, max_tokens=3)
            assert _error(err.value)["type"] == "rate_limit_error" and "busy" in _error(err.value)["message"]
        finally:
            for call in calls:
                call.cancel()
    wait_for(lambda: all_slots_free(grpc_client), 60, "slots free after the cancelled streams")


def test_a_client_that_leaves_mid_stream_frees_its_slot(service, service_checkpoint, grpc_client, model):
    assert EOS not in hf_greedy(service_checkpoint, (300, 12), 480)  # left alone, it would run long
    body = {"model": model, "prompt": [300, 12], "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.Client(timeout=120) as http, http.stream("POST", service.openai_base_url + "/completions",
                                                          json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert sum(r.in_flight for r in grpc_client.status().replicas) == 1
    # the connection is gone: Serve cancels the call, the coordinator the replica stream
    wait_for(lambda: all_slots_free(grpc_client), 30, "the slot freed after the client left")
