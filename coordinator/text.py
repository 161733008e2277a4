"""Completion text as tokens arrive: incremental decoding and stop strings.

Decoding token by token breaks characters that span tokens (byte-level BPE
splits UTF-8 sequences), so `IncrementalText` decodes a short window of recent
tokens and emits only text that can no longer change. What it has emitted is a
function of the tokens alone, never of how they arrived: the text of the longest
run of tokens from the start that does not end in an incomplete character
(U+FFFD). Concatenated deltas equal decoding the whole completion at once.

That is what makes a resume exact: a client that resumes with the tokens it
received holds exactly the text those tokens settle, so a new `IncrementalText`
given the same tokens (`push`, its delta dropped) continues after that text —
not after less (repeating text) and not after more (losing a held-back
character whose last bytes come later).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_INCOMPLETE = "\ufffd"


class IncrementalText:
    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self._prefix = 0  # window start: tokens before it are settled
        self._read = 0  # tokens whose text has been emitted
        self._checked = 0  # tokens up to which every end has been tried (each is settled or incomplete)
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True) if self.tokenizer else ""

    def push(self, ids: Iterable[int]) -> str:
        """Add tokens; returns the text they settle (possibly ""), cut after a stop string."""
        self.ids.extend(ids)
        if self.stopped or self.tokenizer is None:
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        # settle up to the last token after which no character is left incomplete: nearly always
        # the last one. Ends checked by an earlier push stay as they were (the tokens before them
        # do not change), so each end is decoded once.
        checked, self._checked = max(self._checked, self._read), len(self.ids)
        for end in range(len(self.ids), checked, -1):
            after = self._decode(self.ids[self._prefix : end])
            if len(after) > len(before) and not after.endswith(_INCOMPLETE):
                self._prefix, self._read = self._read, end
                return self._emit(after[len(before) :])
        return ""

    def flush(self) -> str:
        """At the end of the generation: whatever text is still held back, even an incomplete character."""
        if self.stopped or self.tokenizer is None:
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = self._checked = len(self.ids)
        return self._emit(after[len(before) :]) if len(after) > len(before) else ""

    def _emit(self, delta: str) -> str:
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        full = self.text + delta
        cut = None
        for stop in self.stops:
            at = full.find(stop, start)
            if at >= 0 and (cut is None or at + len(stop) < cut):
                cut = at + len(stop)
        if cut is not None:
            self.stopped = True
            delta = full[len(self.text) : cut]
        self.text += delta
        return delta
