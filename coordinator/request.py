"""From a `GenerateRequest` message to a replica's `GenerationRequest`, checking every field.

Every check names the field the way the client wrote it (`sampling.top_p`,
`prompt.token_ids`, ...), so a bad request is one clear INVALID_ARGUMENT.
A request with `resume` becomes the same generation continued: its prompt is
the original prompt followed by the tokens already received, its budget what
is left, its seed the same — sampling draws depend on (seed, absolute position)
only, so the continuation is the one the broken stream would have produced.
"""

from __future__ import annotations

import math
import secrets
import uuid
from dataclasses import dataclass, replace
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from protos.ringpipe.v1 import inference_pb2 as pb
from shards.errors import RequestError
from shards.sampling import SamplingParams
from shards.scheduler import GenerationRequest

MAX_ID_CHARS = 256  # request_id and session_id
MAX_STOPS = 16
MAX_STOP_CHARS = 256
M = TypeVar("M", bound=Message)


def decode(request: bytes | M, message_type: type[M]) -> M:
    """The request as a message: Serve's proxy passes the bytes a client sent (coordinator/servicers.py);
    bytes that are not a valid `message_type` are a RequestError naming `request`. A message passes as is."""
    if not isinstance(request, bytes):
        return request
    try:
        return message_type.FromString(request)
    except DecodeError:
        raise RequestError("request", f"the {len(request)} bytes sent are not a valid "
                           f"{message_type.DESCRIPTOR.full_name} message") from None


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_seq_len: int
    max_new_tokens: int  # the most a request may ask for
    max_request_bytes: int
    eos_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Job:
    """A checked request: what to run, and what the client already has."""

    request_id: str
    session_id: str
    prompt: tuple[int, ...]  # as the client sent it (tokenized), without resume tokens
    received: tuple[int, ...]  # resume tokens, already delivered to the client
    max_new_tokens: int  # the whole budget, resume tokens included
    sampling: SamplingParams
    stop_token_ids: frozenset[int]
    stops: tuple[str, ...]

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.received)

    def finished_already(self, max_seq_len: int) -> str | None:
        """The finish reason when the resume tokens already complete the generation."""
        if self.received and self.received[-1] in self.stop_token_ids:
            return "stop"
        if self.remaining <= 0 or len(self.prompt) + len(self.received) >= max_seq_len:
            return "length"
        return None

    def generation(self) -> GenerationRequest:
        """What a replica runs, under an id of its own: a client resending `request_id` (it lost its
        coordinator) must not collide with the orphaned first call, still running on a head."""
        return GenerationRequest(
            f"{self.request_id}~{secrets.token_hex(4)}", self.prompt + self.received, self.remaining, self.sampling,
            self.stop_token_ids,
        )

    def resumed(self, delivered: tuple[int, ...]) -> Job:
        """The same generation, continued after `delivered` (every token the client has now)."""
        return replace(self, received=delivered)


def parse_request(msg: pb.GenerateRequest, limits: Limits, tokenizer=None) -> Job:
    size = msg.ByteSize()
    if size > limits.max_request_bytes:
        raise RequestError("request", f"{size} bytes is over the limit of {limits.max_request_bytes} bytes")
    for name in ("request_id", "session_id"):
        if len(getattr(msg, name)) > MAX_ID_CHARS:
            raise RequestError(name, f"longer than {MAX_ID_CHARS} characters")

    prompt = _prompt(msg, limits, tokenizer)
    received = tuple(msg.resume.received_token_ids)
    _check_ids("resume.received_token_ids", received, limits.vocab_size)

    if msg.max_new_tokens < 1:
        raise RequestError("max_new_tokens", f"must be at least 1, got {msg.max_new_tokens}")
    if msg.max_new_tokens > limits.max_new_tokens:
        raise RequestError("max_new_tokens", f"{msg.max_new_tokens} is over the limit of {limits.max_new_tokens}")
    if len(received) > msg.max_new_tokens:
        raise RequestError(
            "resume.received_token_ids", f"{len(received)} tokens is more than max_new_tokens={msg.max_new_tokens}"
        )
    if len(prompt) >= limits.max_seq_len:
        raise RequestError(
            "prompt", f"{len(prompt)} tokens leave no room to generate (the context is {limits.max_seq_len} tokens)"
        )

    stop_ids = tuple(msg.stop_token_ids)
    _check_ids("stop_token_ids", stop_ids, limits.vocab_size)
    stops = tuple(msg.stop)
    if len(stops) > MAX_STOPS:
        raise RequestError("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise RequestError("stop", f"each stop string must have 1 to {MAX_STOP_CHARS} characters")

    return Job(
        request_id=msg.request_id or uuid.uuid4().hex,
        session_id=msg.session_id,
        prompt=prompt,
        received=received,
        max_new_tokens=msg.max_new_tokens,
        sampling=_sampling(msg),
        stop_token_ids=frozenset(stop_ids) | (frozenset() if msg.ignore_eos else limits.eos_token_ids),
        stops=stops,
    )


def _prompt(msg: pb.GenerateRequest, limits: Limits, tokenizer) -> tuple[int, ...]:
    which = msg.WhichOneof("prompt")
    if which is None:
        raise RequestError("prompt", "set either prompt text or token_ids")
    if which == "text":
        if not msg.text:
            raise RequestError("prompt.text", "is empty")
        if tokenizer is None:
            raise RequestError("prompt.text", "this model has no tokenizer.json; send token_ids instead")
        ids = tuple(tokenizer.encode(msg.text).ids)
        if not ids:
            raise RequestError("prompt.text", "encodes to no tokens")
        return ids
    ids = tuple(msg.token_ids.ids)
    if not ids:
        raise RequestError("prompt.token_ids", "is empty")
    _check_ids("prompt.token_ids", ids, limits.vocab_size)
    return ids


def _check_ids(field: str, ids: tuple[int, ...], vocab_size: int) -> None:
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise RequestError(field, f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def _sampling(msg: pb.GenerateRequest) -> SamplingParams:
    s = msg.sampling
    temperature = s.temperature if s.HasField("temperature") else 0.0
    if not (math.isfinite(temperature) and temperature >= 0):
        raise RequestError("sampling.temperature", f"must be ≥ 0 (0 = greedy), got {temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:  # also catches NaN
        raise RequestError("sampling.top_p", f"must be in (0, 1], got {top_p}")
    # any uint64; unset: the server picks one, and returns it so that a resume can send it back
    seed = s.seed if s.HasField("seed") else secrets.randbelow(2**64)
    return SamplingParams(temperature, s.top_k, top_p, seed)
