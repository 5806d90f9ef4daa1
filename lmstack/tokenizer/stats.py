"""Compression statistics of tokenizers on a corpus: bytes per token, characters per token.

Use it to choose a vocabulary size or compare a trained tokenizer with a model's own (fewer tokens for the
same text = longer effective context and cheaper training). Same readers as training (``train.iter_texts``).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from lmstack.tokenizer.tokenizer import Tokenizer
from lmstack.tokenizer.train import ReadStats, iter_texts


def tokenizer_stats(tokenizers: Sequence[Tokenizer], inputs: Iterable[str] | Sequence[str | os.PathLike],
                    text_field: str = "text", max_chars: int | None = None, batch_size: int = 256,
                    show_progress: bool = True) -> list[dict]:
    """One dict per tokenizer: documents, chars, bytes, tokens, bytes_per_token, chars_per_token.

    All tokenizers see the same texts (read once); ``max_chars`` caps the text read."""
    stats = ReadStats()
    tokens = [0] * len(tokenizers)
    n_bytes = n_chars = 0
    batch: list[str] = []

    def flush() -> None:
        for k, tok in enumerate(tokenizers):
            tokens[k] += sum(len(ids) for ids in tok.encode_batch(batch))
        batch.clear()

    for text in iter_texts(inputs, text_field, stats, show_progress):
        if max_chars is not None and n_chars + len(text) > max_chars:
            text = text[: max_chars - n_chars]
        batch.append(text)
        n_chars += len(text)
        n_bytes += len(text.encode("utf-8"))
        if len(batch) >= batch_size:
            flush()
        if max_chars is not None and n_chars >= max_chars:
            break
    if batch:
        flush()
    return [{"documents": stats.documents, "chars": n_chars, "bytes": n_bytes, "tokens": t,
             "bytes_per_token": n_bytes / t if t else 0.0, "chars_per_token": n_chars / t if t else 0.0,
             "bad_records": stats.bad_records} for t in tokens]
