"""The ringpipe.v1 API: committed stubs match the .proto files, and they work end to end.

The gRPC test runs a real server on 127.0.0.1 with toy servicers defined here (the
real ones live in `coordinator/`), so it checks the stubs, not the serving logic.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from protos import generate
from protos.ringpipe.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

RPC_TIMEOUT_S = 10.0


def committed_stubs(root: Path) -> dict[Path, bytes]:
    package = root / generate.PROTO_PACKAGE_DIR
    return {
        p.relative_to(root): p.read_bytes()
        for p in sorted(package.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and generate.is_generated(p)
    }


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    fresh = {rel: (tmp_path / rel).read_bytes() for rel in written}
    committed = committed_stubs(generate.PROTO_ROOT)

    missing = sorted(str(p) for p in fresh.keys() - committed.keys())
    stale = sorted(str(p) for p in committed.keys() - fresh.keys())
    differ = sorted(str(p) for p in fresh.keys() & committed.keys() if fresh[p] != committed[p])
    assert not (missing or stale or differ), (
        "protos/ringpipe is out of date with its .proto files: run `make protos` and commit. "
        f"missing: {missing}, no longer generated: {stale}, different: {differ}. "
        "(If you changed no .proto, your grpcio-tools version differs from the one that "
        "made the committed stubs; their headers say which.)"
    )


def test_rewrite_imports_makes_stub_imports_absolute() -> None:
    src = "import grpc\nfrom ringpipe.v1 import inference_pb2 as x\nfrom google.protobuf import y\n"
    out = generate.rewrite_imports(src)
    assert "from protos.ringpipe.v1 import inference_pb2 as x\n" in out
    assert "from google.protobuf import y\n" in out
    assert generate.import_errors("import ringpipe.v1.inference_pb2\n")


def test_request_and_response_round_trip() -> None:
    request = inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=[1, 2, 3]),
        max_new_tokens=16,
        sampling=inference_pb2.SamplingParams(temperature=0.7, top_p=0.9, seed=0),
        stop=["\n\n"],
        stop_token_ids=[2],
        session_id="s-1",
        request_id="r-1",
        resume=inference_pb2.Resume(received_token_ids=[5, 6]),
    )
    parsed = inference_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert parsed == request
    assert parsed.WhichOneof("prompt") == "token_ids"
    assert list(parsed.token_ids.ids) == [1, 2, 3]
    # seed 0 is a real seed, distinguishable from "unset"; top_k was never set.
    assert parsed.sampling.HasField("seed") and parsed.sampling.seed == 0
    assert not parsed.sampling.HasField("top_k")
    # The prompt is a oneof: setting text clears the token ids.
    parsed.text = "hello"
    assert parsed.WhichOneof("prompt") == "text" and not parsed.HasField("token_ids")

    response = inference_pb2.GenerateResponse(
        request_id="r-1",
        token_ids=[5, 6, 7],
        text="abc",
        finish_reason=inference_pb2.FINISH_REASON_LENGTH,
        usage=inference_pb2.Usage(prompt_tokens=3, completion_tokens=3),
        served_by=inference_pb2.ServedBy(replica_id="replica-0", epoch=4),
        timings=inference_pb2.Timings(queue_ms=1.5, time_to_first_token_ms=12.25),
    )
    assert inference_pb2.GenerateResponse.FromString(response.SerializeToString()) == response

    status = admin_pb2.ClusterStatusResponse(
        epoch=4,
        replicas=[
            admin_pb2.ReplicaStatus(
                replica_id="replica-0",
                state=admin_pb2.REPLICA_STATE_SERVING,
                epoch=3,
                stages=[
                    admin_pb2.StageStatus(
                        index=0, node_id="n0", address="127.0.0.1", layer_start=0, layer_end=16
                    )
                ],
                ring_share=1.0,
                in_flight=2,
                queue_depth=1,
            )
        ],
    )
    assert admin_pb2.ClusterStatusResponse.FromString(status.SerializeToString()) == status


class EchoInference(inference_pb2_grpc.InferenceServicer):
    """Generates the prompt's own token ids back, up to max_new_tokens."""

    def _completion(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> list[int]:
        if request.WhichOneof("prompt") != "token_ids":
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "prompt: the echo server needs token_ids"
            )
        return list(request.token_ids.ids)[: request.max_new_tokens]

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        tokens = self._completion(request, context)
        return inference_pb2.GenerateResponse(
            request_id=request.request_id,
            token_ids=tokens,
            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            usage=inference_pb2.Usage(
                prompt_tokens=len(request.token_ids.ids), completion_tokens=len(tokens)
            ),
            served_by=inference_pb2.ServedBy(replica_id="echo", epoch=1),
        )

    def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateStreamResponse]:
        tokens = self._completion(request, context)
        for offset, token in enumerate(tokens):
            yield inference_pb2.GenerateStreamResponse(
                request_id=request.request_id, token_ids=[token], offset=offset
            )
        yield inference_pb2.GenerateStreamResponse(
            request_id=request.request_id,
            offset=len(tokens),
            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            usage=inference_pb2.Usage(
                prompt_tokens=len(request.token_ids.ids), completion_tokens=len(tokens)
            ),
        )


class OneReplicaAdmin(admin_pb2_grpc.AdminServicer):
    def ClusterStatus(
        self, request: admin_pb2.ClusterStatusRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ClusterStatusResponse:
        replica = admin_pb2.ReplicaStatus(replica_id="echo", state=admin_pb2.REPLICA_STATE_SERVING)
        return admin_pb2.ClusterStatusResponse(epoch=1, replicas=[replica])


@pytest.fixture
def channel() -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceServicer_to_server(EchoInference(), server)
    admin_pb2_grpc.add_AdminServicer_to_server(OneReplicaAdmin(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port, "could not bind a port on 127.0.0.1"
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        server.stop(grace=None).wait(RPC_TIMEOUT_S)


def echo_request(**fields: object) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=[11, 12, 13, 14]), request_id="r-7", **fields
    )


def test_generate_through_the_stubs(channel: grpc.Channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    response = stub.Generate(echo_request(max_new_tokens=3), timeout=RPC_TIMEOUT_S)
    assert list(response.token_ids) == [11, 12, 13]
    assert response.request_id == "r-7"
    assert response.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (4, 3)
    assert response.served_by.replica_id == "echo"


def test_generate_stream_through_the_stubs(channel: grpc.Channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    chunks = list(stub.GenerateStream(echo_request(max_new_tokens=10), timeout=RPC_TIMEOUT_S))
    streamed = [t for chunk in chunks for t in chunk.token_ids]
    assert streamed == [11, 12, 13, 14]
    assert [c.offset for c in chunks] == [0, 1, 2, 3, 4]
    assert all(c.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 4


def test_errors_arrive_as_grpc_status(channel: grpc.Channel) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.Generate(
            inference_pb2.GenerateRequest(text="hi", max_new_tokens=1), timeout=RPC_TIMEOUT_S
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in raised.value.details()


def test_cluster_status_through_the_stubs(channel: grpc.Channel) -> None:
    stub = admin_pb2_grpc.AdminStub(channel)
    status = stub.ClusterStatus(admin_pb2.ClusterStatusRequest(), timeout=RPC_TIMEOUT_S)
    assert status.epoch == 1
    assert [(r.replica_id, r.state) for r in status.replicas] == [
        ("echo", admin_pb2.REPLICA_STATE_SERVING)
    ]
