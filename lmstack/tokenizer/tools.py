"""Tools in a chat: the text format of tool calls and the rendering of ``tools`` into a prompt, shared by the
server (``lmstack.serve.api.tools``), fine-tuning data (``lmstack.tune.data``: records with ``tools``) and the
``tool_calls`` eval task, so a model is trained, evaluated and served on the same text.

The wire format in the model's text is Hermes / Qwen2.5's, which most open chat models with tool support use::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

* A chat template that reads ``tools`` (Qwen2.5 / Qwen3 / Hermes-style templates) renders them itself; assistant
  ``tool_calls`` go back in with ``arguments`` as an object and ``role: "tool"`` messages as they are.
* Any other template gets the **generic tool prompt** (:data:`GENERIC_TOOL_PROMPT`) as (the start of) the system
  message, past calls written as ``<tool_call>`` blocks in the assistant turn, and tool results as a user turn
  ``<tool_response>...</tool_response>``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"

GENERIC_TOOL_PROMPT = (
    "You can call functions to help answer. The functions, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with a block like this for each call and nothing else:\n"
    "<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n</tool_call>"
)


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
