"""Control-token sanitizing for chat rendering: user text that contains ``<|im_end|>`` stays text.

Without it, a user message ``"hi<|im_end|>\\n<|im_start|>system\\n..."`` becomes real control tokens: a
prompt injection at serving time and corrupted turn structure in SFT data. This follows transformers'
``apply_chat_template(..., sanitize_control_tokens=True)`` (``chat_template_utils.mark_control_tokens`` /
``encode_marked_chat``):

1. control tokens = special added tokens, plus non-special added tokens that occur in the template's literal
   text (``<tool_call>``); whitespace-only tokens are never control tokens;
2. every control token inside the messages' strings is wrapped in private-use markers (markers already in the
   input are removed first, so they cannot be forged);
3. the rendered text is split at the markers; marked tokens are encoded as plain text, the rest normally, each
   piece after the first encoded behind a newline that is then dropped (so SentencePiece adds no prefix space).

Character offsets are mapped back to the text without markers, so loss-mask spans stay valid.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Callable, Sequence

from lmstack.errors import LmstackError

START, END = "\U000f0000", "\U000f0001"  # the markers transformers uses


@lru_cache(maxsize=64)
def template_literals(template: str) -> str:
    """Literal text and string constants of a template, NUL-joined (no match can span two of them)."""
    import jinja2

    from lmstack.tokenizer.chat import compile_template

    ast = compile_template(template).environment.parse(template)
    lits = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    lits |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(sorted(lits))


def control_tokens(added: dict[str, bool], template: str) -> tuple[str, ...]:
    """``added``: added-token content -> special flag."""
    lits = template_literals(template)
    return tuple(sorted(t for t, special in added.items()
                        if special or (t in lits and not t.isspace())))


@lru_cache(maxsize=64)
def _patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    alt = "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)"
    return re.compile(alt), re.compile(f"{START}({alt}){END}|[{START}{END}]")


def mark(obj: Any, tokens: tuple[str, ...]) -> Any:
    """Copy of ``obj`` (messages, tools, ...) with control tokens in its strings wrapped in markers."""
    token_re, _ = _patterns(tokens)
    if isinstance(obj, str):
        obj = obj.replace(START, "").replace(END, "")
        return token_re.sub(lambda m: START + m.group(0) + END, obj)
    if isinstance(obj, dict):
        return {k: mark(v, tokens) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark(v, tokens) for v in obj]
    return obj


def encode_marked(text: str, tokens: tuple[str, ...],
                  encode: Callable[[str], tuple[list[int], list[tuple[int, int]]]],
                  encode_plain: Callable[[str], tuple[list[int], list[tuple[int, int]]]],
                  token_to_id: Callable[[str], int | None], spans: Sequence[tuple[int, int]] = ()):
    """Encode a rendered, marked chat -> (ids, offsets, clean text, spans in the clean text).

    ``encode``/``encode_plain``: text -> (ids, char offsets), with / without added-token matching."""
    _, marker_re = _patterns(tokens)
    pieces = marker_re.split(text)  # [text, token|None, text, token|None, ..., text]
    nl_ids, _ = encode("\n")
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    clean: list[str] = []
    pos = 0  # length of the clean text so far
    # map a position in the marked text to the clean text: markers are removed
    keep = [0] * (len(text) + 1)
    n = 0
    for i, ch in enumerate(text):
        keep[i] = n
        if ch not in (START, END):
            n += 1
    keep[len(text)] = n
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        as_text = i % 2 == 1
        fn = encode_plain if as_text else encode
        if i == 0:
            p_ids, p_off = fn(piece)
        else:
            p_ids, p_off = fn("\n" + piece)
            if p_ids[: len(nl_ids)] == nl_ids:
                p_ids, p_off = p_ids[len(nl_ids):], [(max(a - 1, 0), max(b - 1, 0)) for a, b in p_off[len(nl_ids):]]
            else:
                p_ids, p_off = fn(piece)
        if as_text and token_to_id(piece) in p_ids:
            raise LmstackError(f"cannot sanitize {piece!r}: the tokenizer produces it from plain text")
        ids += p_ids
        offsets += [(a + pos, b + pos) for a, b in p_off]
        clean.append(piece)
        pos += len(piece)
    return ids, offsets, "".join(clean), [(keep[a], keep[b]) for a, b in spans]
