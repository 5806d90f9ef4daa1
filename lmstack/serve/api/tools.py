"""Tool (function) calling for ``/v1/chat/completions``: validate ``tools`` / ``tool_choice``, render them into
the prompt, constrain the arguments, and parse ``tool_calls`` out of the text (whole or streamed).

The text format (``<tool_call>`` blocks, Hermes / Qwen2.5's) and the rendering of tools into the prompt live in
:mod:`lmstack.tokenizer.tools`, shared with fine-tuning data and the ``tool_calls`` eval task.

* ``tool_choice: "required"`` or a named function constrains the output with a grammar: one (or, with
  ``parallel_tool_calls``, up to :data:`MAX_PARALLEL_CALLS`) ``<tool_call>`` blocks whose JSON is
  ``{"name": <a tool>, "arguments": <that tool's parameters schema>}`` — the arguments always parse and validate.
  ``"auto"`` leaves the model free to answer or call, but a call it opens is held to the same grammar (a lazy
  grammar); ``"none"`` leaves the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lmstack.serve.api.errors import bad_request
from lmstack.serve.structured import JSON_OPTIONS, MAX_SPEC_BYTES
from lmstack.serve.types import StructuredOutput
from lmstack.tokenizer.tools import (  # noqa: F401  (the text format lives in the tokenizer layer)
    CLOSE, GENERIC_TOOL_PROMPT, OPEN, held_back, parse_tool_calls, render_messages, template_has_tools)

MAX_TOOLS = 128
MAX_TOOLS_BYTES = 256 * 1024  # all tool definitions together, as JSON
MAX_PARALLEL_CALLS = 8
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's function-name rule (plus '.')


def check_tools(tools: list[Any] | None) -> list[dict[str, Any]]:
    """The tools as ``{"type": "function", "function": {"name", "description", "parameters"}}``; 400 with the
    reason for a tool without a name, a bad name, a duplicate, parameters that are not a schema, or over a cap."""
    if not tools:
        return []
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of {\"type\": \"function\", \"function\": {...}}.", param="tools")
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"tools has {len(tools)} entries; at most {MAX_TOOLS}.", param="tools")
    size = len(json.dumps(tools, ensure_ascii=False).encode("utf-8", "replace"))
    if size > MAX_TOOLS_BYTES:
        raise bad_request(f"tools is {size} bytes of JSON; at most {MAX_TOOLS_BYTES}.", param="tools")
    out, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise bad_request(f"{where}: only tools of type 'function' are supported.", param=where)
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"{where}.function is missing.", param=where)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"{where}.function.name is missing; every tool needs a name.", param=where)
        if not NAME_RE.match(name):
            raise bad_request(f"{where}.function.name {name[:80]!r} must be 1-64 letters, digits, '_', '-' or '.'.",
                              param=where)
        if name in seen:
            raise bad_request(f"{where}: two tools are named {name!r}.", param=where)
        seen.add(name)
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad_request(f"{where}.function.parameters must be a JSON schema object.", param=where)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise bad_request(f"{where}.function.description must be a string.", param=where)
        entry = {"name": name, "parameters": params}
        if desc:
            entry["description"] = desc
        if fn.get("strict") is not None:
            entry["strict"] = bool(fn.get("strict"))
        out.append({"type": "function", "function": entry})
    return out


def check_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> str | None:
    """``"none"`` / ``"auto"`` / ``"required"``, or the name of the function it forces; 400 for anything else."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"tool_choice {choice[:40]!r} is not one of 'none', 'auto', 'required' or "
                              "{\"type\": \"function\", \"function\": {\"name\": ...}}.", param="tool_choice")
        if choice == "required" and not tools:
            raise bad_request("tool_choice 'required' needs tools.", param="tool_choice")
        return choice
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise bad_request("tool_choice must name a function: {\"type\": \"function\", \"function\": "
                              "{\"name\": ...}}.", param="tool_choice")
        names = [t["function"]["name"] for t in tools]
        if name not in names:
            raise bad_request(f"tool_choice names the function {name[:80]!r}, which is not in tools "
                              f"({', '.join(names[:20]) or 'none given'}).", param="tool_choice")
        return name
    raise bad_request("tool_choice must be a string or an object.", param="tool_choice")


def tool_grammar(tools: list[dict[str, Any]], choice: str, parallel: bool) -> StructuredOutput:
    """The grammar of the tool calls a response may make: ``<tool_call>`` blocks whose JSON is one of the tools
    with arguments matching its schema.

    ``required`` / a named function: the response is one (``parallel``: up to :data:`MAX_PARALLEL_CALLS`) call
    block(s). ``auto`` is *lazy* (llama.cpp's lazy grammars, as one grammar): free text that never contains
    ``<tool_call>`` (``PROSE``), or free text up to the first ``<tool_call>`` (``PRE``) and from there only valid
    call blocks — the model still decides whether to call, and a call it opens always parses and validates."""
    fns = [t["function"] for t in tools if choice in ("required", "auto") or t["function"]["name"] == choice]
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False} for f in fns]
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    body = json.dumps(schema, ensure_ascii=False)
    if len(body.encode("utf-8", "replace")) > MAX_SPEC_BYTES * 4:
        raise bad_request("the tools' parameter schemas are too large to constrain.", param="tools")
    more = f' ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    rules = f'call: "{OPEN}\\n" args "\\n{CLOSE}"\nargs: %json {body}\n'
    if choice == "auto":
        return StructuredOutput("lark", (
            f'start: PROSE | PRE "\\n" args "\\n{CLOSE}"{more}\n'
            f"PROSE: /(?s:.*)/ & ~/(?s:.*{OPEN}.*)/\n"  # text with no call in it
            f"PRE: /(?s:.*){OPEN}/ & ~/(?s:.*{OPEN}.+)/\n" + rules))  # text ending at the first <tool_call>
    return StructuredOutput("lark", f"start: call{more}\n" + rules)


class ToolStream:
    """Turns one choice's growing text into content deltas and tool-call deltas (OpenAI's chunk format)."""

    def __init__(self, names: set[str]):
        self.names = names
        self.sent_content = 0  # characters of content streamed
        self.calls: list[dict[str, Any]] = []
        self.in_calls = False

    def step(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, new tool-call deltas) for the text so far."""
        content, calls, _ = parse_tool_calls(text, self.names, final)
        if len(content) < len(text):
            self.in_calls = True
            safe = len(content)
        else:
            safe = len(text) if final else len(text) - held_back(text)
        delta = text[self.sent_content:safe] if safe > self.sent_content else ""
        self.sent_content = max(self.sent_content, safe)
        deltas = []
        for c in calls[len(self.calls):]:
            i = len(self.calls)
            self.calls.append(c)
            deltas.append({"index": i, "id": c["id"], "type": "function",
                           "function": {"name": c["function"]["name"], "arguments": ""}})
            deltas.append({"index": i, "function": {"arguments": c["function"]["arguments"]}})
        return delta, deltas
