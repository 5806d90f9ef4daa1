"""Chat templates with Hugging Face semantics, and the assistant-only loss mask.

Rendering follows ``transformers.utils.chat_template_utils`` (v4.4x-5.x): a jinja2
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with ``loopcontrols``, a
``{% generation %}`` block tag, ``raise_exception``, ``strftime_now``, a non-escaping ``tojson``, and the
tokenizer's named special tokens (``bos_token``, ``eos_token``, ...) passed as template variables.

The loss mask selects the tokens the model must learn to produce: each assistant message's content and the
marker that ends its turn (``<|im_end|>``, ``<|eot_id|>``, ``</s>``). Two ways to find those characters:

1. The template has ``{% generation %}...{% endgeneration %}`` blocks (lmstack's own does): the characters
   rendered inside them, exactly as ``apply_chat_template(..., return_assistant_tokens_mask=True)``.
2. Otherwise (Llama 3, Qwen2, Mistral templates): prefix differences. For assistant message ``i``,
   ``P = render(messages[:i], add_generation_prompt=True)`` and ``Q = render(messages[:i+1])``; the turn is
   ``Q[len(P):]``, cut after its last special token (the end marker) so trailing newlines stay unmasked.
   When a template rewrites earlier turns (``Q`` is not a prefix of the full text), the assistant content
   is searched for in the full text in order, and the end marker right after it is included.
Tokens are then masked when their character span overlaps an assistant span (``char_to_token`` semantics).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

from lmstack.errors import LmstackError

GENERATION_TAG_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class ChatEncoding:
    """A rendered, tokenized conversation. ``loss_mask[i] == 1`` where ``input_ids[i]`` is an assistant token."""

    input_ids: list[int]
    loss_mask: list[int]
    text: str = ""
    spans: list[tuple[int, int]] = field(default_factory=list)  # assistant character spans in ``text``

    def __len__(self) -> int:
        return len(self.input_ids)


# ------------------------------------------------------------------------------------------------ jinja


class _TemplateError(LmstackError):
    pass


@lru_cache(maxsize=64)
def compile_template(template: str):
    """Compile a chat template in a sandbox configured like transformers'. Cached per template string."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(Extension):
        """``{% generation %}body{% endgeneration %}`` renders body and records its character span."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(lmstack_tracker=self)
            self.local = threading.local()  # compiled templates are cached and shared: one state per thread

        @property
        def blocks(self) -> list[str] | None:
            return getattr(self.local, "blocks", None)

        @property
        def spans(self) -> list[tuple[int, int]] | None:
            return getattr(self.local, "spans", None)

        def start(self, blocks, spans) -> None:
            self.local.blocks, self.local.spans = blocks, spans

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

        def _track(self, caller):
            rv = caller()
            if self.blocks is not None:
                start = sum(len(b) for b in self.blocks)
                self.spans.append((start, start + len(rv)))
            return rv

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise _TemplateError(f"chat template has a jinja syntax error at line {e.lineno}: {e.message}") from None


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
        raise LmstackError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if hasattr(m, "model_dump"):  # pydantic messages (e.g. an OpenAI request model), as transformers accepts
            m = m.model_dump()
        elif dataclasses.is_dataclass(m) and not isinstance(m, type):
            m = dataclasses.asdict(m)
        if not isinstance(m, dict) or "role" not in m:
            raise LmstackError(f"message {i} must be a dict with a 'role' (got {m!r:.80})")
        out.append({k: v for k, v in m.items() if v is not None})  # content=None -> key absent, as transformers
    return out


def render_template(template: str, messages: Sequence[dict], add_generation_prompt: bool = False,
                    track: bool = False, **variables: Any) -> tuple[str, list[tuple[int, int]]]:
    """Render ``template``; returns (text, character spans of ``{% generation %}`` blocks when ``track``)."""
    import jinja2

    compiled = compile_template(template)
    msgs = normalize_messages(messages)
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    tracker = compiled.environment.lmstack_tracker
    try:
        if not track:
            return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt, **variables), []
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        tracker.start(blocks, spans)
        try:
            for block in compiled.generate(messages=msgs, add_generation_prompt=add_generation_prompt, **variables):
                blocks.append(block)
        finally:
            tracker.start(None, None)
        return "".join(blocks), spans
    except jinja2.exceptions.TemplateError as e:
        raise _TemplateError(f"chat template refused the conversation: {e}") from None


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_continuation(template: str, messages: Sequence[dict], field: str = "content",
                        **variables: Any) -> str:
    """Render so that the model continues the final message (transformers' ``continue_final_message``):
    the final message's end marker and anything after it are cut off."""
    msgs = [dict(m) for m in normalize_messages(messages)]
    if not msgs:
        raise LmstackError("continue_final_message needs at least one message")
    final = msgs[-1].get(field)
    if isinstance(final, list):  # content parts: continue the last text part
        parts = [dict(p) for p in final]
        idx = next((i for i in reversed(range(len(parts))) if "text" in parts[i]), None)
        if idx is None:
            raise LmstackError("continue_final_message: the final message has no text part to continue")
        final = parts[idx]["text"]
        parts[idx]["text"] = final + _CONTINUE_TAG
        msgs[-1][field] = parts
    elif isinstance(final, str):
        msgs[-1][field] = final + _CONTINUE_TAG
    else:
        raise LmstackError(f"continue_final_message: the final message has no {field!r} to continue")
    text, _ = render_template(template, msgs, False, **variables)
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise LmstackError("continue_final_message: the chat template drops or rewrites the final message, "
                           "so it cannot be continued; render with add_generation_prompt=True instead")
    loc = text.rindex(tag)
    return text[:loc] if text[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:loc].rstrip()


# -------------------------------------------------------------------------------------------- loss mask


def _trim_turn(text: str, start: int, end: int) -> int:
    """End of the turn ``text[start:end]`` without its trailing whitespace (the newline after ``<|im_end|>``)."""
    return start + len(text[start:end].rstrip())


def assistant_spans(template: str, messages: Sequence[dict], add_generation_prompt: bool = False,
                    special_tokens: Sequence[str] = (), **variables: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of assistant content + end marker (see module docstring)."""
    msgs = normalize_messages(messages)
    if GENERATION_TAG_RE.search(template):
        return render_template(template, msgs, add_generation_prompt, track=True, **variables)
    full, _ = render_template(template, msgs, add_generation_prompt, **variables)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m.get("role") != "assistant":
            continue
        span = None
        try:
            prefix, _ = render_template(template, msgs[:i], True, **variables)  # i == 0: may add a system prompt
            turn, _ = render_template(template, msgs[: i + 1], False, **variables)
            # A template that ignores add_generation_prompt (Mistral's, which has no assistant header) leaves any
            # role header inside the diff: start the span where the content starts, when it can be found there.
            no_gen_prompt = bool(i) and prefix == render_template(template, msgs[:i], False, **variables)[0]
        except LmstackError:
            prefix, turn = None, None
        if prefix is not None and turn.startswith(prefix) and full.startswith(turn) and len(turn) > len(prefix):
            a = len(prefix)
            if no_gen_prompt:
                found = _search_span(turn, m, a, special_tokens)
                a = found[0] if found else a
            span = (a, _trim_turn(full, a, len(turn)))
        else:
            span = _search_span(full, m, cursor, special_tokens)
        if span is None:
            raise LmstackError(
                f"cannot locate assistant message {i} in the rendered chat: the template changes it; add "
                "{% generation %}...{% endgeneration %} around the assistant content in the chat template")
        if span[1] > span[0]:
            spans.append(span)
            cursor = span[1]
    return full, spans


def _search_span(full: str, message: dict, cursor: int, special_tokens: Sequence[str]):
    content = message.get("content", "")
    if not isinstance(content, str):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    # The content as given, else the answer after a reasoning block that templates drop from past turns.
    candidates = [content, content.strip()]
    if "</think>" in content:
        candidates.append(content.split("</think>")[-1].strip())
    a = -1
    for cand in candidates:
        if cand and (a := full.find(cand, cursor)) >= 0:
            content = cand
            break
    if a < 0:
        return None
    b = a + len(content)
    rest = full[b:]
    for tok in sorted(special_tokens, key=len, reverse=True):  # include the end marker right after the content
        stripped = rest.lstrip(" ")
        if tok and stripped.startswith(tok):
            b += len(rest) - len(stripped) + len(tok)
            break
    return a, b


def mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character range ``[s, e)`` overlaps a span, else 0. O(tokens + spans)."""
    mask = [0] * len(offsets)
    j = 0
    spans = sorted(spans)
    for t, (s, e) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        if j < len(spans) and s < spans[j][1] and max(e, s + 1) > spans[j][0]:
            mask[t] = 1
    return mask


def assistant_loss_mask(tokenizer: Any, messages: Sequence[dict], chat_template: str | None = None,
                        add_generation_prompt: bool = False, **variables: Any) -> ChatEncoding:
    """Render + tokenize + assistant mask for a ``transformers`` tokenizer the user brings.

    Works with any ``PreTrainedTokenizerFast`` (needs offsets); the template defaults to the tokenizer's own."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    if not template:
        raise LmstackError("tokenizer has no chat_template; pass chat_template=...")
    kw = {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()
          if isinstance(v, str) or hasattr(v, "content")}
    kw.update(variables)
    specials = list(getattr(tokenizer, "all_special_tokens", [])) + [
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    text, spans = assistant_spans(template, messages, add_generation_prompt, special_tokens=specials, **kw)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    return ChatEncoding(ids, mask_from_offsets(enc["offset_mapping"], spans), text, spans)


def pick_template(template: Any, name: str | None = None, tools: Any = None) -> str | None:
    """``chat_template`` may be a string or a list of ``{"name", "template"}`` (HF named templates)."""
    if template is None or isinstance(template, str):
        if name not in (None, "default") and template is not None:
            raise LmstackError(f"chat template {name!r} not found; this tokenizer has one unnamed template")
        return template
    if isinstance(template, list):
        template = {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t}
    if isinstance(template, dict):
        if name is None:
            name = "tool_use" if tools is not None and "tool_use" in template else "default"
            if name not in template and len(template) == 1:
                name = next(iter(template))
        if name not in template:
            raise LmstackError(f"chat template {name!r} not found; available: {', '.join(sorted(template))}")
        return template[name]
    raise LmstackError(f"chat_template must be a string or a list of named templates, got {type(template).__name__}")

