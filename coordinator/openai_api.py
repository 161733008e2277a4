"""The OpenAI HTTP API, answered by the coordinator behind Serve's HTTP proxy.

    GET  /v1/models
    POST /v1/completions
    POST /v1/chat/completions      (both with `stream: true`: server-sent events ending in `data: [DONE]`)

A request takes the gRPC front's path from the `Job` on (`Coordinator.run`):
the same routing (the session key is the `X-Session-Id` header, else `user`,
else the prompt prefix), the same takeover and mid-stream resume, the same
metrics. The token is `Authorization: Bearer <token>`, as gRPC's metadata.
Failures are OpenAI's JSON error shape (`{"error": {"message", "type",
"param", "code"}}`) with the HTTP status `coordinator.errors.HTTP_STATUS` gives
the gRPC code of the same failure. A stream answers its status before the
first event (a full cluster is a 429, not a 200 that breaks); a failure after
that is an error event, then the stream ends without `[DONE]`.

The deadline is `server.request_timeout_s` (504), kept here rather than by
Serve's proxy, which would answer 408 in its own shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from coordinator.errors import DeadlineExceeded, NotFound, http_status_for, status_for
from coordinator.openai_request import CHAT, OpenAIRequest, parse_openai
from failover.metrics import count_request
from shards.errors import RequestError

log = logging.getLogger("ringpipe.coordinator")

ROUTES = {"/v1/models": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST"}
KINDS = {"/v1/completions": "completions", "/v1/chat/completions": CHAT}


async def respond(coordinator, request):
    """The answer to one HTTP request (a Starlette `Request` from Serve's proxy)."""
    from starlette.responses import JSONResponse, StreamingResponse

    path = _route(request.scope)
    try:
        method = ROUTES.get(path)
        if method is None:
            raise NotFound(f"no route {path!r}: ringpipe answers {', '.join(ROUTES)}")
        if request.method != method:
            return error_response(RequestError("method", f"{path} takes {method}, not {request.method}"), 405)
        token = request.headers.get("authorization", "")
        if path == "/v1/models":
            coordinator.check_token(token, "'Authorization' header")
            return JSONResponse(models_body(coordinator.settings.model_name))
        try:
            coordinator.check_token(token, "'Authorization' header")
            req = await _admit(coordinator, request, KINDS[path])
        except Exception as exc:
            count_request(status_for(exc)[0].name)  # refused before the shared path, which counts the rest
            raise
        timeout_s = coordinator.settings.request_timeout_s
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        chunks = coordinator.run(req.job)
        first = await _next(chunks, deadline)  # the status is known before anything is sent
        if req.stream:
            events = _events(req, coordinator.settings.model_name, first, chunks, deadline)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _collect(req, coordinator.settings.model_name, first, chunks, deadline))
    except Exception as exc:  # noqa: BLE001 — every failure becomes an OpenAI error
        return error_response(exc)


class BodyTooLarge(RequestError):
    """A body over `server.max_request_bytes` (413)."""


async def _admit(coordinator, request, kind: str) -> OpenAIRequest:
    """The checked request, from its body."""
    raw, limit = await request.body(), coordinator.limits.max_request_bytes
    if len(raw) > limit:
        raise BodyTooLarge("body", f"{len(raw)} bytes is over the limit of {limit} bytes (server.max_request_bytes)")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise RequestError("body", f"is not valid JSON: {exc}") from None
    return parse_openai(kind, body, request.headers, coordinator.limits, coordinator.tokenizer,
                        coordinator.chat_template, coordinator.settings.model_name)


def _route(scope: dict) -> str:
    """The request's path below the app's route prefix (Serve passes the prefix as the root path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
    if root and path.startswith(root + "/"):
        path = path[len(root):]
    return path.rstrip("/")


async def _next(chunks: AsyncIterator, deadline: float | None):
    try:
        async with asyncio.timeout_at(deadline):
            return await anext(chunks)
    except TimeoutError:
        await chunks.aclose()  # cancels the replica stream (the head frees the slot)
        raise DeadlineExceeded("the request ran past its deadline (server.request_timeout_s)") from None


async def _end(chunks: AsyncIterator) -> None:
    """Let the generation run past its last chunk to its end, where it records the request's
    metrics as finished (closed before that, it would count as cancelled)."""
    if await anext(chunks, None) is not None:
        raise RuntimeError("the generation went on after its finish reason")


async def _collect(req: OpenAIRequest, model: str, first, chunks, deadline) -> dict:
    text, count, chunk = [], 0, first
    while True:
        text.append(chunk.text_delta)
        count += len(chunk.token_ids)
        if chunk.finish_reason:
            await _end(chunks)
            break
        chunk = await _next(chunks, deadline)
    body = _envelope(req, model, stream=False)
    answer = "".join(text)
    finish = _finish(chunk.finish_reason)
    if req.kind == CHAT:
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": answer}, "logprobs": None,
                            "finish_reason": finish}]
    else:
        body["choices"] = [{"index": 0, "text": answer, "logprobs": None, "finish_reason": finish}]
    body["usage"] = _usage(req, count)
    return body


async def _events(req: OpenAIRequest, model: str, first, chunks, deadline) -> AsyncIterator[str]:
    count, chunk = 0, first
    try:
        if req.kind == CHAT:  # the role first, as OpenAI sends it
            yield _sse(_stream_chunk(req, model, {"role": "assistant", "content": ""}, None))
        while True:
            count += len(chunk.token_ids)
            finish = _finish(chunk.finish_reason) if chunk.finish_reason else None
            if chunk.text_delta or finish:
                content = {"content": chunk.text_delta} if chunk.text_delta else {}
                yield _sse(_stream_chunk(req, model, content if req.kind == CHAT else chunk.text_delta, None))
            if finish:
                await _end(chunks)
                yield _sse(_stream_chunk(req, model, {} if req.kind == CHAT else "", finish))
                break
            chunk = await _next(chunks, deadline)
        if req.include_usage:
            last = _envelope(req, model, stream=True)
            last["choices"], last["usage"] = [], _usage(req, count)
            yield _sse(last)
        yield "data: [DONE]\n\n"
    except Exception as exc:  # noqa: BLE001 — the status was sent: the error goes as the last event
        status, kind, message = http_status_for(exc)
        yield _sse(_error(message, kind, _param(exc), status))
    finally:
        await chunks.aclose()


def _stream_chunk(req: OpenAIRequest, model: str, delta, finish: str | None) -> dict:
    body = _envelope(req, model, stream=True)
    if req.kind == CHAT:
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        body["choices"] = [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}]
    if req.include_usage:
        body["usage"] = None
    return body


def _envelope(req: OpenAIRequest, model: str, stream: bool) -> dict:
    if req.kind == CHAT:
        kind, prefix = ("chat.completion.chunk" if stream else "chat.completion"), "chatcmpl-"
    else:
        kind, prefix = "text_completion", "cmpl-"
    return {"id": prefix + req.job.request_id, "object": kind, "created": int(time.time()), "model": model,
            "system_fingerprint": None}


def _usage(req: OpenAIRequest, completion_tokens: int) -> dict:
    prompt = len(req.job.prompt)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def models_body(model: str) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "ringpipe"}]}


def _param(exc: BaseException) -> str | None:
    if isinstance(exc, RequestError):
        return exc.field
    return "model" if isinstance(exc, NotFound) and str(exc).startswith("model:") else None


def _error(message: str, kind: str, param: str | None, status: int) -> dict:
    code = {401: "invalid_api_key", 404: "model_not_found" if param == "model" else "not_found"}.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: BaseException, status: int | None = None):
    from starlette.responses import JSONResponse

    http_status, kind, message = http_status_for(exc)
    if isinstance(exc, BodyTooLarge):
        http_status = 413
    if http_status == 500:
        log.error("HTTP request failed", exc_info=exc)
    return JSONResponse(_error(message, kind, _param(exc), status or http_status), status_code=status or http_status)
