"""A checkpoint's chat template, rendered the way transformers renders it.

The template is Jinja: `chat_template` in `tokenizer_config.json` (a string, or a
list of named templates of which `default` is used), else the file
`chat_template.jinja` beside it (where newer transformers versions save it).
It is rendered in a sandbox with transformers' settings (`trim_blocks`,
`lstrip_blocks`, the `loopcontrols` extension, `raise_exception`, `strftime_now`
and a `tojson` that keeps non-ASCII text) and the special tokens of the
tokenizer config as variables (`bos_token`, `eos_token`, ...), so that a chat
prompt is, character for character, what `tokenizer.apply_chat_template(...,
add_generation_prompt=True, tokenize=False)` gives. Its tokens are then the
rendered text encoded without adding special tokens again (the template writes
them itself), as transformers does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from shards.errors import RequestError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.special_tokens = special_tokens

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages`, ending where the assistant's answer starts.
        A template that refuses the conversation (`raise_exception`) is the request's error."""
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise RequestError("messages", f"the model's chat template refused them: {exc}") from None


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none."""
    root = Path(model_dir)
    config_path = root / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not source and (root / "chat_template.jinja").is_file():
        source = (root / "chat_template.jinja").read_text()
    if not source:
        return None
    special = {}
    for name in SPECIAL_TOKENS:
        token = config.get(name)
        if isinstance(token, dict):  # an AddedToken as saved: {"content": ..., ...}
            token = token.get("content")
        if isinstance(token, str):
            special[name] = token
    return ChatTemplate(source, special)
