"""lmstack's default chat template: ChatML (OpenAI's Chat Markup Language, as used by Qwen2).

    <|im_start|>system\\nYou are helpful.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n

The assistant content and its ``<|im_end|>`` sit inside ``{% generation %}`` so that
``transformers``' ``apply_chat_template(..., return_assistant_tokens_mask=True)`` and lmstack's
``render_chat`` both mask exactly those characters. Content may be a string or a list of
``{"type": "text", "text": ...}`` parts (OpenAI style); other part types are refused.
"""

from __future__ import annotations

CHATML_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}\n"
    "{{- raise_exception('unknown role ' + message['role'] + '; use system, user, assistant or tool') -}}\n"
    "{%- endif -%}\n"
    "{%- if message['content'] is string -%}\n"
    "{%- set content = message['content'] -%}\n"
    "{%- elif message['content'] is defined -%}\n"
    "{%- set ns = namespace(text='') -%}\n"
    "{%- for part in message['content'] -%}\n"
    "{%- if part['type'] != 'text' -%}\n"
    "{{- raise_exception('only text content parts are supported, got ' + part['type']) -}}\n"
    "{%- endif -%}\n"
    "{%- set ns.text = ns.text + part['text'] -%}\n"
    "{%- endfor -%}\n"
    "{%- set content = ns.text -%}\n"
    "{%- else -%}\n"
    "{%- set content = '' -%}\n"
    "{%- endif -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "{%- if message['role'] == 'assistant' -%}\n"
    "{%- generation -%}\n"
    "{{- content + '<|im_end|>' -}}\n"
    "{%- endgeneration -%}\n"
    "{{- '\\n' -}}\n"
    "{%- else -%}\n"
    "{{- content + '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)
