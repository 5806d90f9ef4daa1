"""Incremental detokenization for streaming generation.

Token boundaries do not fall on character boundaries: a Chinese character or an emoji is often split over
2-4 byte-level tokens, and SentencePiece-style decoders drop a word's leading space when a token is decoded
alone. Decoding token by token therefore prints U+FFFD or loses spaces. This follows vLLM's
``detokenize_incrementally`` / transformers' ``TextStreamer``: keep a short window of ids, decode
``ids[prefix:]`` and ``ids[prefix:read]``, emit the difference, and hold it back while it ends in an
incomplete character (U+FFFD). ``flush()`` releases whatever is left (a genuinely invalid byte sequence
then comes out as U+FFFD, as the full decode would).
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """``step(token_id) -> str`` returns newly completed text; ``flush() -> str`` returns the rest."""

    def __init__(self, decode: Callable[[Sequence[int]], str], skip_ids: frozenset[int] = frozenset()):
        self._decode = decode  # ids -> str (the tokenizer's full decoder)
        self._skip = skip_ids  # ids never shown (special tokens when skip_special_tokens)
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted and no longer decoded
        self._read = 0  # ids[:read] have been emitted
        self.text = ""  # everything emitted so far

    def step(self, token_id: int) -> str:
        token_id = int(token_id)  # numpy / torch scalars hash differently from int
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""  # nothing complete yet (partial UTF-8, or a token that renders as nothing so far)
        delta = new_text[len(prefix_text):]
        # The new window starts at the old read point; ids before it are dropped (bounded memory).
        del self._ids[:self._read]
        self._prefix, self._read = 0, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        delta = new_text[len(prefix_text):]
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta

    def reset(self) -> None:
        self._ids.clear()
        self._prefix = self._read = 0
        self.text = ""
