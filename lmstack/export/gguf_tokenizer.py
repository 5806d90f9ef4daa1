"""A byte-level BPE tokenizer as GGUF metadata and back (``tokenizer.json`` <-> ``tokenizer.ggml.*``).

References: the GGUF specification's tokenizer keys (``tokenizer.ggml.model = "gpt2"``, ``tokens``,
``token_type``, ``merges``, ``pre``, special token ids, ``tokenizer.chat_template``); GPT-2 byte-level BPE
(Radford et al. 2019); the split patterns are those each model family publishes in its own ``tokenizer.json``
(GPT-2, Llama 3 / cl100k, Qwen2, SmolLM's individual digits), keyed by llama.cpp's ``tokenizer.ggml.pre`` names.

Import (GGUF -> ``tokenizer.json``): every token keeps its id; control tokens (type 3) become special added
tokens, user-defined ones (type 4) plain added tokens (matched whole, as llama.cpp does); the split is chosen by
``tokenizer.ggml.pre``; ``add_bos_token`` becomes a post-processor. Export is the reverse; a split pattern that
no llama.cpp name describes (lmstack's own, which keeps CJK apart from Latin) is written as the closest name
(``llama-bpe``) plus the exact pattern under ``tokenizer.lmstack.pre_regex``, which import prefers.
"""

from __future__ import annotations

import json
from typing import Any

from lmstack.errors import CheckpointError

# token_type values of the GGUF spec (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PRE_REGEX_KEY = "tokenizer.lmstack.pre_regex"
MAX_PRE_REGEX = 4096  # characters; a longer pattern in a file is refused
MAX_TOKENS = 1 << 20  # a vocabulary above a million entries is not a real model
MAX_TEMPLATE = 1 << 20  # characters of a chat template

# Split patterns, as the model families ship them in their tokenizer.json files.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (kind, regex, ignore_merges). kind: "gpt2" (ByteLevel's own GPT-2 regex),
# "digits+gpt2" (each digit alone, then GPT-2's regex: SmolLM), "split" (the regex, then byte mapping).
PRE_TOKENIZERS: dict[str, tuple[str, str | None, bool]] = {
    "gpt-2": ("gpt2", None, False),
    "default": ("gpt2", None, False),
    "smollm": ("digits+gpt2", None, False),
    "llama-bpe": ("split", _LLAMA3, True),
    "llama3": ("split", _LLAMA3, True),
    "llama-v3": ("split", _LLAMA3, True),
    "smaug-bpe": ("split", _LLAMA3, True),
    "dbrx": ("split", _LLAMA3, True),
    "qwen2": ("split", _QWEN2, False),
    "deepseek-r1-qwen": ("split", _QWEN2, False),
    "gpt-4o": ("split", _GPT4O, False),
    "llama4": ("split", _GPT4O, False),
}
# lmstack model_type -> the pre name written when the tokenizer's split matches none of the table
_FALLBACK_PRE = "llama-bpe"


# Gemma's chat format (the Gemma 3 model card): turns "<start_of_turn>user|model\n...<end_of_turn>\n", a system
# message folded into the first user turn, the assistant's role called "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + "
    "(ns.system if m['role'] == 'user' else '') + (m['content'] | trim) + '<end_of_turn>\\n' }}"
    "{%- if m['role'] == 'user' -%}{%- set ns.system = '' -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------- import
def _byte_alphabet() -> set[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return set(ByteLevel.alphabet())


def tokenizer_from_gguf(meta: dict[str, Any], where: str) -> tuple[str, dict[str, Any], list[int]]:
    """(tokenizer.json text, tokenizer_config.json dict, every end-of-generation id) from GGUF metadata."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise CheckpointError(f"{where}: the GGUF file has no tokenizer (no tokenizer.ggml.model key)")
    if kind not in ("gpt2", "llama"):
        raise CheckpointError(f'{where}: tokenizer model "{kind}" is not supported; lmstack imports byte-level '
                              'BPE ("gpt2": Llama 3, Qwen2/3, SmolLM, ...) and SentencePiece BPE ("llama": Gemma, '
                              'Llama 2) tokenizers')
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise CheckpointError(f"{where}: tokenizer.ggml.tokens is missing or empty")
    if len(tokens) > MAX_TOKENS:
        raise CheckpointError(f"{where}: {len(tokens)} tokens is more than lmstack accepts ({MAX_TOKENS})")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{where}: {len(types)} token types for {len(tokens)} tokens")
    if kind == "llama":
        tk, vocab = _sentencepiece_bpe(meta, tokens, types, where)
    else:
        tk, vocab = _byte_level_bpe(meta, tokens, where)

    # control tokens stay whole and are skipped when decoding with skip_special_tokens; user-defined ones stay whole
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (CONTROL, USER_DEFINED) and vocab.get(t) == i:
            added.append(AddedToken(t, special=ty == CONTROL, normalized=False, single_word=False,
                                    lstrip=False, rstrip=False))
    specials = [a for a in added if a.special]
    if specials:
        tk.add_special_tokens(specials)
    if len(specials) != len(added):
        tk.add_tokens([a for a in added if not a.special])

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None
        if not isinstance(i, int) or not 0 <= i < len(tokens):
            raise CheckpointError(f"{where}: tokenizer.ggml.{key} = {i!r} is not a token id (0..{len(tokens) - 1})")
        return tokens[i]

    bos, eos = tok("bos_token_id"), tok("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos is not None) or (add_eos and eos is not None):
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        tk.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(
                ([bos] if add_bos else []) + ([eos] if add_eos else []))])
    elif kind == "gpt2":
        tk.post_processor = processors.ByteLevel(trim_offsets=False)

    template = meta.get("tokenizer.chat_template")
    if template is None and meta.get("general.architecture") == "gemma3":
        template = GEMMA_CHAT_TEMPLATE  # Gemma 3 GGUF files often carry no template; this is Gemma's turn format
    if template is not None and (not isinstance(template, str) or len(template) > MAX_TEMPLATE):
        raise CheckpointError(f"{where}: tokenizer.chat_template is not a string of at most {MAX_TEMPLATE} characters")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "unk_token": tok("unknown_token_id"), "pad_token": tok("padding_token_id"),
        "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": ty == CONTROL}
                                 for i, (t, ty) in enumerate(zip(tokens, types))
                                 if ty in (CONTROL, USER_DEFINED) and vocab.get(t) == i},
    }
    ctx = next((v for k, v in meta.items() if k.endswith(".context_length") and isinstance(v, int)), None)
    if ctx:
        config["model_max_length"] = ctx
    if template:
        config["chat_template"] = template
    config = {k: v for k, v in config.items() if v is not None}

    stops: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        i = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(i, int) and 0 <= i < len(tokens) and i not in stops:
            stops.append(i)
    from lmstack.tokenizer.pretokenize import KNOWN_END_MARKERS

    for marker in (*KNOWN_END_MARKERS, "<|endoftext|>"):  # end-of-turn markers llama.cpp also stops on
        i = vocab.get(marker)
        if i is not None and types[i] == CONTROL and i not in stops:
            stops.append(i)
    return tk.to_str(), config, stops


def _byte_level_bpe(meta: dict[str, Any], tokens: list, where: str):
    """(tokenizers.Tokenizer, vocab) for ``tokenizer.ggml.model = "gpt2"``: byte-level BPE with the file's merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise CheckpointError(f"{where}: tokenizer.ggml.merges is missing (a BPE tokenizer needs its merges)")

    pre = meta.get("tokenizer.ggml.pre", "default")
    own_regex = meta.get(PRE_REGEX_KEY)
    if own_regex is not None:
        if not isinstance(own_regex, str) or len(own_regex) > MAX_PRE_REGEX:
            raise CheckpointError(f"{where}: {PRE_REGEX_KEY} is not a string of at most {MAX_PRE_REGEX} characters")
        pre_kind, regex, ignore_merges = "split", own_regex, PRE_TOKENIZERS.get(pre, ("", "", False))[2]
    elif pre in PRE_TOKENIZERS:
        pre_kind, regex, ignore_merges = PRE_TOKENIZERS[pre]
    else:
        raise CheckpointError(f'{where}: pre-tokenizer "{pre}" (tokenizer.ggml.pre) is not supported; '
                              f'supported: {", ".join(PRE_TOKENIZERS)}')

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if not isinstance(t, str):
            raise CheckpointError(f"{where}: token {i} is not a string")
        vocab.setdefault(t, i)  # a repeated spelling (rare padding entries) keeps its first id
    pairs = []
    for j, m in enumerate(merges):
        parts = m.split(" ") if isinstance(m, str) else []
        if len(parts) != 2:
            raise CheckpointError(f"{where}: merge {j} ({m!r}) is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False,
                              ignore_merges=ignore_merges))
    tk.normalizer = None
    if pre_kind == "gpt2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre_kind == "digits+gpt2":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        try:
            split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        except Exception as e:  # the Rust regex compiler raises a plain Exception
            raise CheckpointError(f"{where}: the pre-tokenizer pattern does not compile ({e})") from None
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            split, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk, vocab


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list, types: list, where: str):
    """(tokenizers.Tokenizer, vocab) for ``tokenizer.ggml.model = "llama"`` (SentencePiece BPE: Gemma, Llama 2).

    llama.cpp's SPM tokenizer replaces spaces by U+2581, then, over the whole text, repeatedly merges the adjacent
    pair whose concatenation is a vocabulary token with the highest score; characters no token covers fall back
    to their UTF-8 bytes (``<0xNN>`` tokens). The same as a ``tokenizers`` BPE model whose merge ranks are those
    scores: every split ``a + b = t`` of every normal token ``t`` (both parts tokens) is a merge, ranked by the
    score of ``t`` (highest first), with byte fallback and no pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise CheckpointError(f"{where}: tokenizer.ggml.scores is missing or does not match the tokens "
                              "(a SentencePiece tokenizer needs one score per token)")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if not isinstance(t, str):
            raise CheckpointError(f"{where}: token {i} is not a string")
        vocab.setdefault(t, i)
    ranked = []
    for t, i in vocab.items():
        if types[i] != NORMAL or len(t) < 2:
            continue
        sc = float(scores[i])
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                ranked.append((-sc, i, k, a, b))
    ranked.sort()
    merges = [(a, b) for _, _, _, a, b in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tk.normalizer = normalizers.Sequence(steps)
    tk.pre_tokenizer = None
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    return tk, vocab


# ---------------------------------------------------------------------------------------------- export
def _known_pre(pre_tokenizer: dict[str, Any] | None) -> tuple[str, str | None]:
    """(llama.cpp pre name, exact regex to record or None) for a tokenizer.json pre_tokenizer section."""
    if pre_tokenizer is None:
        raise CheckpointError("the tokenizer has no pre-tokenizer; GGUF export needs a byte-level BPE tokenizer")
    t = pre_tokenizer.get("type")
    if t == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2", None
    if t == "Sequence":
        items = pre_tokenizer.get("pretokenizers", [])
        types = [p.get("type") for p in items]
        if types == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and items[1].get("use_regex", True):
            return "smollm", None
        if types == ["Split", "ByteLevel"] and not items[1].get("use_regex", True):
            pat = items[0].get("pattern", {})
            regex = pat.get("Regex") if isinstance(pat, dict) else None
            if regex is not None:
                for name, (kind, known, _) in PRE_TOKENIZERS.items():
                    if kind == "split" and known == regex:
                        return name, None
                return _FALLBACK_PRE, regex
    raise CheckpointError(f"the tokenizer's pre-tokenizer ({t}) is not one GGUF can describe; "
                          "GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM, lmstack)")


def tokenizer_to_gguf(tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any], n_vocab: int,
                      eos_ids: list[int], chat_template: Any, *, add_bos: bool = False,
                      add_eos: bool = False) -> dict[str, Any]:
    """GGUF tokenizer metadata (key -> value; token lists as Python lists) for a byte-level BPE tokenizer.

    ``add_bos`` / ``add_eos``: whether encoding adds them (the tokenizer's post-processor does, in HF files).

    ``n_vocab`` is the model's embedding rows: the token list is padded to it with ``[PAD{id}]`` (type UNUSED),
    as llama.cpp's converter does; a tokenizer with more ids than the model is refused."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"the tokenizer model is {model.get('type')!r}; GGUF export supports BPE tokenizers")
    if tokenizer_json.get("normalizer") is not None:
        raise CheckpointError("the tokenizer has a normalizer, which GGUF's gpt2 tokenizer cannot describe")
    pre, regex = _known_pre(tokenizer_json.get("pre_tokenizer"))
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: NORMAL for i in by_id}
    for a in tokenizer_json.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    n_tok = max(by_id) + 1
    if n_tok > n_vocab:
        raise CheckpointError(f"the tokenizer has {n_tok} ids but the model's embedding has {n_vocab} rows; "
                              "resize the model's embedding to the tokenizer before exporting")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, UNUSED) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def tid(key: str) -> int | None:
        v = tokenizer_config.get(key)
        s = v.get("content") if isinstance(v, dict) else v
        return next((i for i, t in by_id.items() if t == s), None) if s is not None else None

    out: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(add_bos),
        "tokenizer.ggml.add_eos_token": bool(add_eos),
    }
    if regex is not None:
        out[PRE_REGEX_KEY] = regex
    eos = tid("eos_token")
    stops = [i for i in ([eos] if eos is not None else []) + list(eos_ids) if i is not None]
    stops = list(dict.fromkeys(stops))
    for key, value in (("bos_token_id", tid("bos_token")), ("eos_token_id", stops[0] if stops else None),
                       ("unknown_token_id", tid("unk_token")), ("padding_token_id", tid("pad_token"))):
        if value is not None:
            out[f"tokenizer.ggml.{key}"] = int(value)
    if len(stops) > 1:  # a chat end marker beside eos (<|im_end|>, <|eot_id|>): llama.cpp's end-of-turn id
        out["tokenizer.ggml.eot_token_id"] = int(stops[1])
    if isinstance(chat_template, dict):
        default = chat_template.get("default") or next(iter(chat_template.values()))
        out["tokenizer.chat_template"] = default
        for name, tpl in chat_template.items():
            if name != "default":
                out[f"tokenizer.chat_template.{name}"] = tpl
    elif chat_template:
        out["tokenizer.chat_template"] = chat_template
    return out


def read_tokenizer_json(text: str) -> dict[str, Any]:
    return json.loads(text)
