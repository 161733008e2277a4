"""Routing keys: which ring position a request hashes to.

`session` (the default) keeps a conversation on the replica that holds its KV
cache: the session id when the client gives one, else the prompt's first
`prefix_tokens` tokens, so repeated prefixes meet their cached prefix. `prefix`
always uses the prompt prefix; `random` spreads requests blindly (the baseline
the routing benchmark compares against).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Literal

RoutingMode = Literal["session", "prefix", "random"]


def routing_key(
    prompt: Sequence[int], session_id: str | None = None, mode: RoutingMode = "session", prefix_tokens: int = 32
) -> str:
    if mode == "random":
        return f"random:{uuid.uuid4().hex}"
    if mode == "session" and session_id:
        return f"session:{session_id}"
    return "prefix:" + ",".join(map(str, prompt[:prefix_tokens]))
