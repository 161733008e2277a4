"""The Python client of ringpipe's gRPC API, blocking (`Client`) and asyncio (`AsyncClient`).

    with Client("127.0.0.1:50051") as client:
        print(client.generate("The list type", max_new_tokens=32).text)
        for piece in client.stream("The list type", max_new_tokens=32):
            print(piece.text, end="", flush=True)

Both retry a call answered UNAVAILABLE (no live replica, a replica or
coordinator lost mid-call) with exponential backoff. A stream that breaks is
resumed transparently: the client resends the request with the tokens it has
already received (`resume`), the server continues after them, and the caller
sees every token exactly once. So that a resumed sampled stream continues the
same way, the client picks the seed when the caller gives none.

This module imports only grpc and the generated stubs: it never needs the
server's packages.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from protos.ringpipe.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from protos.ringpipe.v1 import inference_pb2 as pb

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_CANCELLED: "cancelled"}


class RingpipeError(Exception):
    """A call that failed for good: the gRPC status and the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    replica_id: str
    queue_ms: float
    time_to_first_token_ms: float
    seed: int | None = None  # the sampling seed the server used (None: greedy)


@dataclass
class Piece:
    """Tokens of a stream as they arrive; the last piece has `finish_reason`."""

    token_ids: list[int]
    text: str
    offset: int
    replica_id: str
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    epoch: int = 0  # the membership epoch at which `replica_id` took its ring position
    resumes: int = 0  # times this client reopened the stream (a coordinator was lost) before this piece
    repeated: int = 0  # tokens the server sent again in this message, dropped here (a server-side bug)


def build_request(
    prompt: str | Sequence[int],
    max_new_tokens: int = 64,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    session_id: str = "",
    request_id: str = "",
    ignore_eos: bool = False,
) -> pb.GenerateRequest:
    """A GenerateRequest; sampling without a seed gets one here, so that a resume reproduces it."""
    msg = pb.GenerateRequest(
        max_new_tokens=max_new_tokens, stop=list(stop), stop_token_ids=list(stop_token_ids),
        session_id=session_id, request_id=request_id or uuid.uuid4().hex, ignore_eos=ignore_eos,
    )
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids.ids.extend(prompt)
    if temperature is not None:
        msg.sampling.temperature = temperature
    if top_k is not None:
        msg.sampling.top_k = top_k
    if top_p is not None:
        msg.sampling.top_p = top_p
    if seed is None and temperature:
        seed = secrets.randbelow(2**64)
    if seed is not None:
        msg.sampling.seed = seed
    return msg


def _completion(resp: pb.GenerateResponse) -> Completion:
    return Completion(
        resp.request_id, list(resp.token_ids), resp.text, _FINISH.get(resp.finish_reason, "unspecified"),
        resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.served_by.replica_id,
        resp.timings.queue_ms, resp.timings.time_to_first_token_ms,
        resp.seed if resp.HasField("seed") else None,
    )


class _Resumable:
    """The bookkeeping of one stream across attempts: what the caller already has."""

    def __init__(self, request: pb.GenerateRequest) -> None:
        self.request = request
        self.received: list[int] = []
        self.calls = 0

    def next_request(self) -> pb.GenerateRequest:
        self.calls += 1
        msg = pb.GenerateRequest()
        msg.CopyFrom(self.request)
        if self.received:
            msg.resume.received_token_ids[:] = self.received
        return msg

    def accept(self, msg: pb.GenerateStreamResponse) -> Piece | None:
        """The new part of a message (None when it holds nothing new); raises on a gap."""
        ids = list(msg.token_ids)
        skip = len(self.received) - msg.offset  # tokens this message repeats
        if skip < 0:
            raise RingpipeError(
                grpc.StatusCode.DATA_LOSS, f"stream skipped tokens {len(self.received)}..{msg.offset - 1}"
            )
        new = ids[skip:]
        self.received.extend(new)
        reason = _FINISH.get(msg.finish_reason)
        if not new and not msg.text_delta and reason is None:
            return None
        piece = Piece(
            new, msg.text_delta, msg.offset + min(skip, len(ids)), msg.served_by.replica_id, reason,
            epoch=msg.served_by.epoch, resumes=self.calls - 1, repeated=min(skip, len(ids)),
        )
        if msg.HasField("usage"):
            piece.usage = {"prompt_tokens": msg.usage.prompt_tokens, "completion_tokens": msg.usage.completion_tokens}
        if msg.HasField("timings"):
            piece.timings = {"queue_ms": msg.timings.queue_ms, "time_to_first_token_ms": msg.timings.time_to_first_token_ms}
        return piece


class _Policy:
    def __init__(self, retries: int, backoff_s: float, max_backoff_s: float) -> None:
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))

    def give_up(self, err: grpc.RpcError, attempt: int, deadline: float | None) -> bool:
        out_of_time = deadline is not None and time.monotonic() >= deadline
        return not _retryable(err) or attempt >= self.retries or out_of_time


_COORDINATOR_LOST = ("The actor died unexpectedly", "The actor is temporarily unavailable")


def _retryable(err: grpc.RpcError) -> bool:
    """UNAVAILABLE, and the coordinator replica lost mid-call: Serve's proxy reports that as
    INTERNAL with Ray's words for a dead actor ("The actor died unexpectedly before finishing this
    task") or one on a lost node ("The actor is temporarily unavailable: ... Socket closed"),
    though another replica can take the call. Resending is safe: a stream resumes after what it
    received, and a unary call is generated again from the same seed."""
    if err.code() in RETRYABLE:
        return True
    details = err.details() or ""
    return err.code() == grpc.StatusCode.INTERNAL and any(words in details for words in _COORDINATOR_LOST)


def _deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _error(err: grpc.RpcError) -> RingpipeError:
    return RingpipeError(err.code(), err.details() or "")


class _Connection:
    """What both clients hold: a channel (plain, or TLS with `credentials`), the stubs, the token, the retry policy."""

    _insecure_channel = staticmethod(grpc.insecure_channel)
    _secure_channel = staticmethod(grpc.secure_channel)

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        retries: int = 5,
        backoff_s: float = 0.1,
        max_backoff_s: float = 3.0,
    ) -> None:
        self._channel = (
            self._secure_channel(target, credentials) if credentials else self._insecure_channel(target)
        )
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._metadata = _metadata(token)
        self._policy = _Policy(retries, backoff_s, max_backoff_s)


class Client(_Connection):

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *, timeout_s: float | None = None,
                 **options) -> Completion:
        request = build_request(prompt, max_new_tokens, **options)
        deadline = _deadline(timeout_s)
        for attempt in range(self._policy.retries + 1):
            try:
                resp = self._inference.Generate(request, timeout=_remaining(deadline), metadata=self._metadata)
                return _completion(resp)
            except grpc.RpcError as err:
                if self._policy.give_up(err, attempt, deadline):
                    raise _error(err) from None
                time.sleep(self._policy.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *, timeout_s: float | None = None,
               **options) -> Iterator[Piece]:
        state = _Resumable(build_request(prompt, max_new_tokens, **options))
        deadline = _deadline(timeout_s)
        attempt = 0
        while True:
            call = self._inference.GenerateStream(
                state.next_request(), timeout=_remaining(deadline), metadata=self._metadata
            )
            try:
                for msg in call:
                    piece = state.accept(msg)
                    if piece is not None:
                        attempt = 0  # progress: the retry budget is per break
                        yield piece
                        if piece.finish_reason:
                            return
                if attempt >= self._policy.retries:  # ended early without a status: resume like a break
                    raise RingpipeError(grpc.StatusCode.UNAVAILABLE, "stream ended without a finish reason")
            except grpc.RpcError as err:
                if self._policy.give_up(err, attempt, deadline):
                    raise _error(err) from None
            finally:
                call.cancel()  # a caller that stops iterating cancels the generation
            time.sleep(self._policy.delay(attempt))
            attempt += 1

    def status(self, timeout_s: float = 10.0) -> admin_pb2.ClusterStatusResponse:
        try:
            return self._admin.ClusterStatus(admin_pb2.ClusterStatusRequest(), timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(err) from None


class AsyncClient(_Connection):
    """The asyncio twin of `Client`: same options, same retries and resume."""

    _insecure_channel = staticmethod(grpc.aio.insecure_channel)
    _secure_channel = staticmethod(grpc.aio.secure_channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
                       timeout_s: float | None = None, **options) -> Completion:
        request = build_request(prompt, max_new_tokens, **options)
        deadline = _deadline(timeout_s)
        for attempt in range(self._policy.retries + 1):
            try:
                resp = await self._inference.Generate(request, timeout=_remaining(deadline), metadata=self._metadata)
                return _completion(resp)
            except grpc.RpcError as err:
                if self._policy.give_up(err, attempt, deadline):
                    raise _error(err) from None
                await asyncio.sleep(self._policy.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
                     timeout_s: float | None = None, **options) -> AsyncIterator[Piece]:
        state = _Resumable(build_request(prompt, max_new_tokens, **options))
        deadline = _deadline(timeout_s)
        attempt = 0
        while True:
            call = self._inference.GenerateStream(
                state.next_request(), timeout=_remaining(deadline), metadata=self._metadata
            )
            try:
                async for msg in call:
                    piece = state.accept(msg)
                    if piece is not None:
                        attempt = 0
                        yield piece
                        if piece.finish_reason:
                            return
                if attempt >= self._policy.retries:  # ended early without a status: resume like a break
                    raise RingpipeError(grpc.StatusCode.UNAVAILABLE, "stream ended without a finish reason")
            except grpc.RpcError as err:
                if self._policy.give_up(err, attempt, deadline):
                    raise _error(err) from None
            finally:
                call.cancel()
            await asyncio.sleep(self._policy.delay(attempt))
            attempt += 1

    async def status(self, timeout_s: float = 10.0) -> admin_pb2.ClusterStatusResponse:
        try:
            return await self._admin.ClusterStatus(
                admin_pb2.ClusterStatusRequest(), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise _error(err) from None
