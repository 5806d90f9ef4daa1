"""Library side of ``lmstack tokenizer chat`` (the CLI holds no logic)."""

from __future__ import annotations

from lmstack.errors import DataError
from lmstack.tokenizer.tokenizer import Tokenizer
from lmstack.utils.io import read_json


def show_chat(tokenizer_dir: str, messages_json: str, add_generation_prompt: bool = False) -> str:
    """The rendered chat with the trained-on (loss mask 1) text wrapped in ``[[...]]``, plus counts."""
    tok = Tokenizer.from_dir(tokenizer_dir)
    messages = read_json(messages_json)
    if isinstance(messages, dict) and "messages" in messages:
        messages = messages["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{messages_json}: expected a list of {{role, content}} messages")
    enc = tok.render_chat(messages, add_generation_prompt=add_generation_prompt)
    parts, prev = [], 0
    for a, b in enc.spans:
        parts += [enc.text[prev:a], "[[", enc.text[a:b], "]]"]
        prev = b
    parts.append(enc.text[prev:])
    n = sum(enc.loss_mask)
    return "".join(parts) + f"\n-- {len(enc.input_ids)} tokens, {n} trained on (inside [[ ]])"
