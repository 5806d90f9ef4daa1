"""Fixtures for the tokenizer tests: a tiny mixed-language corpus, and tokenizer directories that mimic the
Llama 3, Qwen2 / Qwen2.5 and Mistral layouts with their REAL public chat templates.

The templates below are copied verbatim from the models' ``tokenizer_config.json`` on the Hugging Face Hub
(meta-llama/Meta-Llama-3-8B-Instruct, Qwen/Qwen2-7B-Instruct, Qwen/Qwen2.5-7B-Instruct,
mistralai/Mistral-7B-Instruct-v0.2 == Mixtral-8x7B-Instruct-v0.1). The vocabularies are tiny BPEs trained here
(no hub access), but with each model's special tokens, post-processor, decoder style and tokenizer_class
(so transformers picks the same class, Qwen2Tokenizer / LlamaTokenizer, as for the real directories).

The ``*_TAGGED`` variants are hand-edited copies that wrap the assistant turn in ``{% generation %}``; they
render the same text (checked) and let transformers' own ``return_assistant_tokens_mask`` serve as the
independent reference for lmstack's mask on the untagged originals.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Byte-level BPE keeps every string reversible, including emoji and control characters.",
    "In 2024, the model was trained on 15 trillion tokens with a learning rate of 3e-4.",
    "She said: \"I'll be there at 10:30, don't wait!\"",
    "Transformers use attention; attention uses queries, keys and values.",
]
CHINESE = [
    "机器学习是人工智能的一个分支。",
    "今天天气很好，我们去公园散步吧！",
    "大型语言模型需要大量的训练数据和计算资源。",
    "这个分词器可以处理中文、English 和数字 12345。",
]
CODE = [
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n    pass\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i];\n}\n",
    "SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY name;\n",
]
MISC = ["Emoji 😀👍🏽🇨🇳 and ünïcödé façade naïve", "tabs\tand   spaces\n\n\nnewlines\r\n", "日本語のテキストとカタカナ、한국어 텍스트"]

ROUNDTRIP_CASES = {
    "english": ENGLISH[1],
    "chinese": CHINESE[1],
    "mixed": "GPU加速让训练快了3倍 (3x faster)，cost 降低 40%.",
    "emoji": "👨‍👩‍👧‍👦 family, flags 🇯🇵🇺🇸, skin 👋🏿, 🤖!",
    "code": CODE[0] + CODE[1],
    "whitespace": "  leading\t\ttabs   \n\n\n   trailing   \r\n\r\n    ",
    "control": "nul\x00bell\x07esc\x1b[31mred\x1b[0m del\x7f \u200b\u200d\ufeff",
    "specials_as_text": "text with <|im_end|> inside and <|endoftext|>",
}


def corpus(n: int = 60, seed: int = 0) -> list[str]:
    """~40 KB of deterministic mixed text: English, Chinese, code, misc."""
    rng = random.Random(seed)
    pool = ENGLISH + CHINESE + CODE + MISC
    docs = []
    for _ in range(n):
        k = rng.randint(3, 8)
        docs.append(" ".join(rng.choice(pool) for _ in range(k)))
    return docs


# ------------------------------------------------------------------------------------------- templates

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_TAGGED = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_TAGGED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_TAGGED = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token}}{% endgeneration %}"
    "{% endif %}{% endfor %}"
)

# ------------------------------------------------------------------------------------- tokenizer dirs


def _added(tokens: list[str], backend) -> dict:
    return {str(backend.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t in tokens}


def _byte_level_bpe(texts: list[str], vocab_size: int, specials: list[str]):
    from tokenizers import pre_tokenizers, trainers

    from lmstack.tokenizer.pretokenize import build_bpe_tokenizer

    tok = build_bpe_tokenizer(specials)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def write_llama3_dir(path: Path, texts: list[str]) -> Path:
    """Llama-3-style: byte-level BPE, <|begin_of_text|> added by the post-processor, eos <|eot_id|>."""
    from tokenizers import processors

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _byte_level_bpe(texts, 700, specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
           "clean_up_tokenization_spaces": True, "model_max_length": 8192,
           "added_tokens_decoder": _added(specials, tok), "chat_template": LLAMA3_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": bos, "eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]}
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def write_qwen2_dir(path: Path, texts: list[str], template: str = QWEN2_TEMPLATE) -> Path:
    """Qwen2-style: byte-level BPE, no bos, eos <|im_end|>, pad <|endoftext|>; <tool_call> non-special added."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _byte_level_bpe(texts, 700, specials)
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False),
                    AddedToken("</tool_call>", special=False, normalized=False)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    added = _added(specials, tok)
    for t in ("<tool_call>", "</tool_call>"):
        added[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": False}
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
           "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "model_max_length": 32768,
           "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "added_tokens_decoder": added,
           "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return path


def write_mistral_dir(path: Path, texts: list[str]) -> Path:
    """Mistral/Llama-2-style SentencePiece BPE: Metaspace pre-tokenizer, byte fallback, <s> added by the
    post-processor, decoder that strips the first prefix space. [INST] is plain text (v0.1/v0.2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=900 - 256, special_tokens=specials,
                                                       show_progress=False))
    # SentencePiece layout: <unk> <s> </s>, then the 256 byte tokens <0x00>..<0xFF> in the BASE vocab (not added
    # tokens), then the learned pieces.
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in learned:
        vocab.setdefault(t, len(vocab))
    spec["model"]["vocab"] = vocab
    for a in spec["added_tokens"]:
        a["id"] = vocab[a["content"]]
    tok = Tokenizer.from_str(json.dumps(spec))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
           "unk_token": "<unk>", "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 32768,
           "added_tokens_decoder": _added(specials, tok), "chat_template": MISTRAL_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return path


CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}],
    "system_multi": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "用中文说一遍"},
        {"role": "assistant", "content": "四。😀"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "  You're welcome!  \n"},
    ],
    "ends_with_user": [
        {"role": "user", "content": "Write code"},
        {"role": "assistant", "content": "def f():\n    return 1\n"},
        {"role": "user", "content": "Shorter"},
    ],
}
