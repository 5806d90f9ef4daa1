"""Incremental detokenization with stop strings that never leak into the output.

Text grows token by token through the tokenizer's stream decoder (which never emits half a UTF-8
character). After each token the new tail is searched for the stop strings; on a match the text is cut
at the match (or after it, with ``include_stop_str_in_output``). While streaming, the longest suffix that
could still become a stop string is held back, so a client never sees a partial stop string that is
later removed (vLLM's ``StopChecker`` + ``IncrementalDetokenizer``).
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str], include_stop: bool = False, skip_special_tokens: bool = True):
        try:
            self.decoder = tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens)
        except TypeError:
            self.decoder = tokenizer.stream_decoder()
        self.stop = list(stop)
        self.include_stop = include_stop
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.stopped = False

    def step(self, token_id: int) -> str | None:
        """Append one token; returns the stop string if the text now contains one (text is then cut)."""
        if self.stopped:
            return None
        delta = self.decoder.step(token_id)
        if not delta:
            return None
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += delta
        return self._check(start)

    def flush(self) -> str | None:
        """End of generation: emit bytes the decoder held back (may complete a stop string)."""
        if self.stopped:
            return None
        tail = self.decoder.flush() or ""
        if not tail:
            return None
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += tail
        return self._check(start)

    def _check(self, start: int) -> str | None:
        if not self.stop:
            return None
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        self.stopped = True
        return s

    def visible_text(self, final: bool) -> str:
        """The text safe to show: all of it when final, else minus a suffix that may start a stop string."""
        if final or self.stopped or not self.stop:
            return self.text
        t = self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(t)), hold, -1):
                if t.endswith(s[:k]):
                    hold = k
                    break
        return t[: len(t) - hold] if hold else t
