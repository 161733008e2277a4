"""From an OpenAI request body (`/v1/completions`, `/v1/chat/completions`) to the `Job` the gRPC
front would make of the same request.

The body becomes a `GenerateRequest` and goes through the same `parse_request`
(the same limits, the same checks), and an error names the field as the OpenAI
client wrote it (`max_tokens`, `temperature`, `messages`, ...). Every field is
either used, accepted at the one value that asks for nothing (`n: 1`,
`logprobs: false`, `presence_penalty: 0`, ...), or refused with a 400 naming
it: nothing is silently ignored.

OpenAI's defaults, not the gRPC API's: `temperature` 1 (sampled), `max_tokens`
16 for completions and the server's `max_new_tokens` for chat.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from coordinator.chat import ChatTemplate
from coordinator.errors import NotFound
from coordinator.request import MAX_ID_CHARS, Job, Limits, parse_request
from protos.ringpipe.v1 import inference_pb2 as pb
from shards.errors import RequestError

COMPLETIONS, CHAT = "completions", "chat"
MAX_TEMPERATURE = 2.0  # OpenAI's range
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

USED = {
    COMPLETIONS: {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "user", "stream",
                  "stream_options"},
    CHAT: {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
           "user", "stream", "stream_options"},
}
# fields accepted only at the value(s) that ask for nothing beyond what ringpipe does
NEUTRAL = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,),
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "suffix": ("",),
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "modalities": (["text"],), "store": (False,),
    "parallel_tool_calls": (), "service_tier": ("auto", "default"), "metadata": (), "prediction": (),
    "audio": (), "reasoning_effort": (), "web_search_options": (),
}
ROLES = ("system", "developer", "user", "assistant")
# parse_request's field names → the OpenAI body's
FIELD_NAMES = {
    "sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.seed": "seed",
    "prompt.text": "prompt", "prompt.token_ids": "prompt", "request": "body",
}


@dataclass(frozen=True)
class OpenAIRequest:
    kind: str  # COMPLETIONS | CHAT
    job: Job
    stream: bool
    include_usage: bool


def parse_openai(kind: str, body: object, headers: Mapping[str, str], limits: Limits, tokenizer,
                 chat_template: ChatTemplate | None, model_name: str) -> OpenAIRequest:
    """The checked request; raises RequestError (400) naming the field, or NotFound (404) for another model."""
    if not isinstance(body, dict):
        raise RequestError("body", "must be a JSON object")
    _refuse_unsupported(kind, body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model", "is required: the id /v1/models lists")
    if model != model_name:
        raise NotFound(f"model: the model {model!r} does not exist here; this service serves {model_name!r}")
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise RequestError("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError("stream_options", "accepts only {\"include_usage\": true|false}")
        include_usage = _typed(options, "include_usage", bool, False, "stream_options.include_usage")

    msg = pb.GenerateRequest()
    session = headers.get("x-session-id") or _typed(body, "user", str, "")
    if len(session) > MAX_ID_CHARS:
        raise RequestError("X-Session-Id" if headers.get("x-session-id") else "user",
                           f"longer than {MAX_ID_CHARS} characters")
    msg.session_id = session
    budget_field = "max_tokens"
    if kind == CHAT:
        ids = _chat_prompt(body.get("messages"), tokenizer, chat_template)
        msg.token_ids.ids.extend(ids)
        if body.get("max_completion_tokens") is not None:
            budget_field = "max_completion_tokens"
        default_budget = limits.max_new_tokens
    else:
        _completion_prompt(body.get("prompt"), msg)
        default_budget = COMPLETIONS_MAX_TOKENS
    msg.max_new_tokens = _int(body, budget_field, default_budget)

    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise RequestError("temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {temperature}")
    msg.sampling.temperature = temperature
    msg.sampling.top_p = _number(body, "top_p", 1.0)
    if body.get("seed") is not None:
        seed = _int(body, "seed", 0)
        if not 0 <= seed < 2**64:
            raise RequestError("seed", f"must be in [0, 2**64), got {seed}")
        msg.sampling.seed = seed
    msg.stop.extend(_stops(body.get("stop")))

    try:
        job = parse_request(msg, limits, tokenizer)
    except RequestError as exc:
        name = budget_field if exc.field == "max_new_tokens" else FIELD_NAMES.get(exc.field, exc.field)
        if kind == CHAT and name == "prompt":
            name = "messages"
        raise RequestError(name, exc.message) from None
    return OpenAIRequest(kind, job, stream, include_usage)


def _refuse_unsupported(kind: str, body: dict) -> None:
    for key, value in body.items():
        if key in USED[kind] or value is None:
            continue
        if key not in NEUTRAL:
            raise RequestError(key, f"is not a field of /v1/{'chat/' if kind == CHAT else ''}completions "
                                    "that ringpipe accepts")
        if not any(value == ok and type(value) is type(ok) or (type(ok) is int and _is_number(value) and value == ok)
                   for ok in NEUTRAL[key]):
            allowed = " or ".join(repr(v) for v in NEUTRAL[key])
            raise RequestError(key, "is not supported by ringpipe" + (f" (only {allowed} is accepted)" if allowed else ""))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _typed(body: dict, key: str, kind: type, default, name: str | None = None):
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise RequestError(name or key, f"must be a {'boolean' if kind is bool else 'string'}, got {value!r}")
    return value


def _int(body: dict, key: str, default: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(key, f"must be an integer, got {value!r}")
    if key != "seed":  # an int32 on the gRPC side; parse_request names the limit
        return max(min(value, 2**31 - 1), -(2**31))
    return value


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not _is_number(value):
        raise RequestError(key, f"must be a number, got {value!r}")
    return float(value)


def _stops(value: object) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop", "must be a string or a list of strings")
    return stops


def _completion_prompt(prompt: object, msg: pb.GenerateRequest) -> None:
    """A string, a list of one string, or one list of token ids (nested once or not)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, str):
        msg.text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 for t in prompt):
            raise RequestError("prompt", "token ids must not be negative")
        msg.token_ids.ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise RequestError("prompt", f"{len(prompt)} prompts in one request are not supported: send one per request")
    else:
        raise RequestError("prompt", "is required: a string, or a list of token ids")


def _chat_prompt(messages: object, tokenizer, chat_template: ChatTemplate | None) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "is required: a non-empty list of {role, content}")
    if chat_template is None:
        raise RequestError("messages", "this model has no chat template (chat_template in tokenizer_config.json): "
                                       "use /v1/completions with a prompt")
    if tokenizer is None:
        raise RequestError("messages", "this model has no tokenizer.json: use /v1/completions with token ids")
    plain = [_message(i, m) for i, m in enumerate(messages)]
    text = chat_template.render(plain)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise RequestError("messages", "render to no tokens")
    return ids


def _message(i: int, message: object) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise RequestError(where, "must be an object with role and content")
    extra = set(message) - {"role", "content", "name"}
    if extra:
        raise RequestError(f"{where}.{sorted(extra)[0]}", "is not supported by ringpipe (no tools or function calls)")
    role = message.get("role")
    if role not in ROLES:
        raise RequestError(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"{where}.content[{j}]", f"only text parts are supported, got {kind!r}")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content", "must be a string or a list of text parts")
    out = {"role": role, "content": content}
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out
