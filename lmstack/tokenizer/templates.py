"""lmstack's default chat template: ChatML (OpenAI's Chat Markup Language, as used by Qwen2).

    <|im_start|>system\\nYou are helpful.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n

The assistant content and its ``<|im_end|>`` sit inside ``{% generation %}`` so that
``transformers``' ``apply_chat_template(..., return_assistant_tokens_mask=True)`` and lmstack's
``render_chat`` both mask exactly those characters. Content may be a string or a list of
``{"type": "text", "text": ...}`` parts (OpenAI style); other part types are refused.

Tools follow the Hermes / Qwen2.5 convention: ``tools=[...]`` (JSON schemas) are listed in the system turn inside
``<tools></tools>``; an assistant message's ``tool_calls`` (OpenAI ``{"function": {"name", "arguments"}}`` or
plain ``{"name", "arguments"}``; arguments a dict or a JSON string) render as
``<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`` inside the generation block, so the model learns
to emit them; tool results are ``role: "tool"`` turns.
"""

from __future__ import annotations

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>"
)

# Jinja source, one statement per line (trim_blocks/lstrip_blocks and `-` remove the layout whitespace).
_LINES = [
    "{%- macro text(content) -%}",
    "{%- if content is string -%}{{- content -}}",
    "{%- elif content is defined and content is not none -%}",
    "{%- for part in content -%}",
    "{%- if part['type'] != 'text' -%}",
    "{{- raise_exception('only text content parts are supported, got ' + part['type']) -}}",
    "{%- endif -%}",
    "{{- part['text'] -}}",
    "{%- endfor -%}",
    "{%- endif -%}",
    "{%- endmacro -%}",
    "{%- if tools -%}",
    "{{- '<|im_start|>system\\n' -}}",
    "{%- if messages and messages[0]['role'] == 'system' -%}{{- text(messages[0]['content']) + '\\n\\n' -}}{%- endif -%}",
    "{{- '" + TOOLS_PREAMBLE.replace("\n", "\\n").replace('"', '\\"') + "' -}}",
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}",
    "{{- '" + TOOLS_POSTAMBLE.replace("\n", "\\n") + "<|im_end|>\\n' -}}",
    "{%- endif -%}",
    "{%- for message in messages -%}",
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}",
    "{{- raise_exception('unknown role ' + message['role'] + '; use system, user, assistant or tool') -}}",
    "{%- endif -%}",
    "{%- if not (loop.first and tools and message['role'] == 'system') -%}",
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}",
    "{%- if message['role'] == 'assistant' -%}",
    "{%- generation -%}",
    "{{- text(message['content']) -}}",
    "{%- for call in message['tool_calls'] or [] -%}",
    "{%- set call = call['function'] if call['function'] is defined else call -%}",
    "{%- if not loop.first or message['content'] -%}{{- '\\n' -}}{%- endif -%}",
    "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' -}}",
    "{%- if call['arguments'] is string -%}{{- call['arguments'] -}}{%- else -%}{{- call['arguments'] | tojson -}}{%- endif -%}",
    "{{- '}\\n</tool_call>' -}}",
    "{%- endfor -%}",
    "{{- '<|im_end|>' -}}",
    "{%- endgeneration -%}",
    "{{- '\\n' -}}",
    "{%- else -%}",
    "{{- text(message['content']) + '<|im_end|>\\n' -}}",
    "{%- endif -%}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}",
    "{{- '<|im_start|>assistant\\n' -}}",
    "{%- endif -%}",
]
CHATML_TEMPLATE = "\n".join(_LINES) + "\n"
