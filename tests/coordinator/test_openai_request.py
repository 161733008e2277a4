"""The OpenAI request bodies and chat templates, without a service: templates rendered as transformers
renders them (transformers is the reference), and every field either used or refused by name."""

from __future__ import annotations

import json
import shutil

import pytest

from coordinator.chat import load_chat_template
from coordinator.errors import NotFound
from coordinator.openai_request import CHAT, COMPLETIONS, parse_openai
from coordinator.request import Limits
from shards.checkpoint import load_tokenizer
from shards.errors import RequestError

MODEL = "tiny"
CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is a list? "},
    {"role": "assistant", "content": "A mutable sequence."},
    {"role": "user", "content": [{"type": "text", "text": "And a "}, {"type": "text", "text": "tuple? ü"}]},
]
# a Llama-3-like template: special tokens, the loop, a filter, a namespace, raise_exception
OTHER_TEMPLATE = (
    "{% set ns = namespace(n=0) %}{{ bos_token }}{% for message in messages %}{% set ns.n = ns.n + 1 %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "<|start|>{{ message['role'] | upper }}<|sep|>{{ message['content'] | tojson }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|start|>ASSISTANT<|sep|>{% endif %}"
)


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint("llama", tokenizer=True, vocab=512, layers=1, hidden=32)


@pytest.fixture(scope="module")
def limits():
    return Limits(vocab_size=512, max_seq_len=256, max_new_tokens=100, max_request_bytes=1 << 20,
                  eos_token_ids=frozenset({2}))


def _hf(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _with_template(tmp_path, checkpoint, template, as_file: bool = False, named: bool = False):
    directory = tmp_path / "model"
    directory.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, directory / name)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["chat_template"]
    if as_file:
        (directory / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = [{"name": "default", "template": template}] if named else template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _plain(messages):
    out = []
    for m in messages:
        content = m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
        out.append({"role": m["role"], "content": content})
    return out


def test_the_checkpoint_template_renders_as_transformers_does(checkpoint):
    expected = _hf(checkpoint).apply_chat_template(_plain(CONVERSATION), tokenize=False, add_generation_prompt=True)
    assert load_chat_template(checkpoint).render(_plain(CONVERSATION)) == expected


@pytest.mark.parametrize("where", ["string", "named", "file"])
def test_a_template_from_each_place_renders_as_transformers_does(tmp_path, checkpoint, where):
    directory = _with_template(tmp_path, checkpoint, OTHER_TEMPLATE, as_file=where == "file", named=where == "named")
    expected = _hf(directory).apply_chat_template(_plain(CONVERSATION), tokenize=False, add_generation_prompt=True)
    assert load_chat_template(directory).render(_plain(CONVERSATION)) == expected


def test_chat_prompt_tokens_are_transformers_tokens(checkpoint, limits):
    expected = _hf(checkpoint).apply_chat_template(_plain(CONVERSATION), tokenize=True, add_generation_prompt=True)
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):  # transformers 5 returns a BatchEncoding
        expected = expected["input_ids"]
    req = parse_openai(CHAT, {"model": MODEL, "messages": CONVERSATION}, {}, limits, load_tokenizer(checkpoint),
                       load_chat_template(checkpoint), MODEL)
    assert list(req.job.prompt) == list(expected)


def test_a_template_that_refuses_the_conversation_is_a_bad_messages_field(checkpoint, limits):
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(RequestError) as err:
        parse_openai(CHAT, {"model": MODEL, "messages": messages}, {}, limits, load_tokenizer(checkpoint),
                     load_chat_template(checkpoint), MODEL)
    assert err.value.field == "messages" and "system message must come first" in err.value.message


def test_no_template_is_a_clear_400(tmp_path, checkpoint, limits):
    directory = _with_template(tmp_path, checkpoint, "")
    assert load_chat_template(directory) is None
    with pytest.raises(RequestError) as err:
        parse_openai(CHAT, {"model": MODEL, "messages": CONVERSATION}, {}, limits, load_tokenizer(checkpoint),
                     None, MODEL)
    assert err.value.field == "messages" and "no chat template" in err.value.message


def _parse(kind, body, limits, checkpoint, headers=None):
    return parse_openai(kind, body, headers or {}, limits, load_tokenizer(checkpoint), load_chat_template(checkpoint),
                        MODEL)


def test_fields_are_used_with_openai_defaults(checkpoint, limits):
    tokenizer = load_tokenizer(checkpoint)
    plain = _parse(COMPLETIONS, {"model": MODEL, "prompt": "The list"}, limits, checkpoint)
    assert plain.job.prompt == tuple(tokenizer.encode("The list").ids)
    assert plain.job.max_new_tokens == 16 and plain.job.sampling.temperature == 1.0  # OpenAI's defaults
    assert not plain.stream and not plain.include_usage
    body = {"model": MODEL, "prompt": [[5, 6, 7]], "max_tokens": 9, "temperature": 0, "top_p": 0.5, "seed": 2**64 - 1,
            "stop": ["a", "bc"], "user": "u1", "stream": True, "stream_options": {"include_usage": True},
            "n": 1, "logprobs": None, "presence_penalty": 0.0, "echo": False}
    req = _parse(COMPLETIONS, body, limits, checkpoint)
    assert req.job.prompt == (5, 6, 7) and req.job.max_new_tokens == 9
    assert (req.job.sampling.temperature, req.job.sampling.top_p, req.job.sampling.seed) == (0, 0.5, 2**64 - 1)
    assert req.job.stops == ("a", "bc") and req.job.session_id == "u1" and req.stream and req.include_usage
    headed = _parse(COMPLETIONS, body, limits, checkpoint, headers={"x-session-id": "s9"})
    assert headed.job.session_id == "s9"  # the header wins over `user`
    chat = _parse(CHAT, {"model": MODEL, "messages": CONVERSATION, "max_completion_tokens": 7}, limits, checkpoint)
    assert chat.job.max_new_tokens == 7
    assert _parse(CHAT, {"model": MODEL, "messages": CONVERSATION}, limits, checkpoint).job.max_new_tokens == 100


BAD = [
    (COMPLETIONS, {"prompt": "x"}, "model"),
    (COMPLETIONS, {"model": MODEL}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": ""}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": [5, 999]}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": 101}, "max_tokens"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "temperature": 2.5}, "temperature"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "temperature": True}, "temperature"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "seed": -1}, "seed"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "stop": [1]}, "stop"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "n": 2}, "n"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "logprobs": 3}, "logprobs"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "best_of": 2}, "best_of"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "echo": True}, "echo"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "top_k": 5}, "top_k"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "user": "u" * 300}, "user"),
    (CHAT, {"model": MODEL}, "messages"),
    (CHAT, {"model": MODEL, "messages": []}, "messages"),
    (CHAT, {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
    (CHAT, {"model": MODEL, "messages": [{"role": "assistant", "content": "", "tool_calls": []}]},
     "messages[0].tool_calls"),
    (CHAT, {"model": MODEL, "messages": CONVERSATION, "tools": [{"type": "function"}]}, "tools"),
    (CHAT, {"model": MODEL, "messages": CONVERSATION, "logprobs": True}, "logprobs"),
    (CHAT, {"model": MODEL, "messages": CONVERSATION, "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"model": MODEL, "messages": CONVERSATION, "max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}, "messages"),
]


@pytest.mark.parametrize(("kind", "body", "field"), BAD, ids=[f"{k}-{f}-{i}" for i, (k, _, f) in enumerate(BAD)])
def test_a_bad_or_unsupported_field_is_refused_by_name(checkpoint, limits, kind, body, field):
    with pytest.raises(RequestError) as err:
        _parse(kind, body, limits, checkpoint)
    assert err.value.field == field, err.value


def test_a_model_served_elsewhere_is_not_found(checkpoint, limits):
    with pytest.raises(NotFound) as err:
        _parse(COMPLETIONS, {"model": "gpt-4o", "prompt": "x"}, limits, checkpoint)
    assert "gpt-4o" in str(err.value) and MODEL in str(err.value)
