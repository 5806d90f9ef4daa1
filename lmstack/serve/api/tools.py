"""Tool (function) calling for ``/v1/chat/completions``: validate ``tools`` / ``tool_choice``, render them into
the prompt, constrain the arguments, and parse ``tool_calls`` out of the text (whole or streamed).

The wire format in the model's text is Hermes / Qwen2.5's, which most open chat models with tool support use::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

* A chat template that reads ``tools`` (Qwen2.5 / Qwen3 / Hermes-style templates) renders them itself; assistant
  ``tool_calls`` go back in with ``arguments`` as an object and ``role: "tool"`` messages as they are.
* Any other template gets the **generic tool prompt** (:data:`GENERIC_TOOL_PROMPT`) as (the start of) the system
  message, past calls written as ``<tool_call>`` blocks in the assistant turn, and tool results as a user turn
  ``<tool_response>...</tool_response>``.
* ``tool_choice: "required"`` or a named function constrains the output with a grammar: one (or, with
  ``parallel_tool_calls``, up to :data:`MAX_PARALLEL_CALLS`) ``<tool_call>`` blocks whose JSON is
  ``{"name": <a tool>, "arguments": <that tool's parameters schema>}`` — the arguments always parse and validate.
  ``"auto"`` leaves the model free and parses what it writes; ``"none"`` leaves the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from lmstack.serve.api.errors import bad_request
from lmstack.serve.structured import JSON_OPTIONS, MAX_SPEC_BYTES
from lmstack.serve.types import StructuredOutput

MAX_TOOLS = 128
MAX_TOOLS_BYTES = 256 * 1024  # all tool definitions together, as JSON
MAX_PARALLEL_CALLS = 8
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's function-name rule (plus '.')
OPEN, CLOSE = "<tool_call>", "</tool_call>"

GENERIC_TOOL_PROMPT = (
    "You can call functions to help answer. The functions, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with a block like this for each call and nothing else:\n"
    "<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n</tool_call>"
)


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


def template_has_tools(template: Any) -> bool:
    """Whether the chat template renders ``tools`` itself (Qwen2.5, Qwen3, Hermes, Llama 3.1, ...)."""
    if isinstance(template, dict):
        return "tool_use" in template or any(template_has_tools(t) for t in template.values())
    if isinstance(template, list):
        return any(isinstance(t, dict) and template_has_tools(t.get("template")) for t in template)
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None


def _arguments_obj(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    body = {"name": fn.get("name"), "arguments": _arguments_obj(fn.get("arguments", {}))}
    return f"{OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{CLOSE}"


def render_messages(msgs: list[dict[str, Any]], tools: list[dict[str, Any]], native: bool,
                    choice: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages for the template, tools to pass to it). ``native``: the template renders tools itself."""
    use_tools = tools if tools and choice != "none" else []
    if native:
        out = []
        for m in msgs:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**(c.get("function") or {}),
                                                      "arguments": _arguments_obj((c.get("function") or {})
                                                                                  .get("arguments", {}))}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, (use_tools or None)
    out = []
    for m in msgs:
        role = m["role"]
        if role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        elif role == "assistant" and m.get("tool_calls"):
            blocks = "\n".join(_call_text(c) for c in m["tool_calls"] if isinstance(c, dict))
            text = (m.get("content") or "")
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + blocks})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    if use_tools:
        prompt = GENERIC_TOOL_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in use_tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": prompt + "\n\n" + out[0]["content"]}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def tool_grammar(tools: list[dict[str, Any]], choice: str, parallel: bool) -> StructuredOutput:
    """The grammar for ``required`` / a named function: ``<tool_call>`` blocks whose arguments match the schema."""
    fns = [t["function"] for t in tools if choice == "required" or t["function"]["name"] == choice]
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False} for f in fns]
    schema: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {**schema, "x-guidance": JSON_OPTIONS}
    body = json.dumps(schema, ensure_ascii=False)
    if len(body.encode("utf-8", "replace")) > MAX_SPEC_BYTES * 4:
        raise bad_request("the tools' parameter schemas are too large to constrain.", param="tools")
    more = f' ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    lark = f'start: call{more}\ncall: "{OPEN}\\n" args "\\n{CLOSE}"\nargs: %json {body}\n'
    return StructuredOutput("lark", lark)


# ---------------------------------------------------------------------------------------------- parsing
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def _call(obj: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _arguments_obj(args)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _parse_block(text: str, names: set[str]) -> list[dict[str, Any]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return []
    objs = obj if isinstance(obj, list) else [obj]
    return [c for c in (_call(o, names) for o in objs) if c is not None]


def parse_tool_calls(text: str, names: set[str], final: bool = True) -> tuple[str, list[dict[str, Any]], int]:
    """(content, calls, end) from the model's text: content is the text before the first ``<tool_call>``; calls are
    the complete blocks naming a known tool (with ``final``, an unclosed last block that parses too); ``end`` is
    how far the text has been consumed (for streaming)."""
    start = text.find(OPEN)
    if start < 0:
        return text, [], len(text)
    calls: list[dict[str, Any]] = []
    end = start
    for m in _BLOCK.finditer(text, start):
        calls.extend(_parse_block(m.group(1), names))
        end = m.end()
    if final:
        tail = text.find(OPEN, end)
        if tail >= 0:
            calls.extend(_parse_block(text[tail + len(OPEN):].strip(), names))
            end = len(text)
    return text[:start], calls, end


def held_back(text: str) -> int:
    """How many trailing characters might be the start of ``<tool_call>`` (not yet safe to stream as content)."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0


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
