"""``Tokenizer``: one class over any Hugging Face ``tokenizer.json`` directory (lmstack's, Llama 3, Qwen2, Mistral).

A thin, fast wrapper around the Rust ``tokenizers.Tokenizer`` plus what ``tokenizer_config.json`` adds:
named special tokens (bos/eos/pad), the jinja chat template, and generation-ending ids. Ids are those that
``transformers.AutoTokenizer`` gives for the same directory (tested), without importing transformers.

On disk (Hugging Face layout, see docs/tokenizer.md):
    tokenizer.json          the model, pre-tokenizer, decoder, added tokens   (sha256 of its bytes = identity)
    tokenizer_config.json   bos/eos/pad/unk tokens, chat_template (str or list of named ones), added_tokens_decoder
    chat_template.jinja     optional; overrides tokenizer_config.json's chat_template (transformers >= 4.43 layout)
    chat_template.json      optional {"chat_template": ...} (processor layout); below .jinja, above the config
    generation_config.json  optional; its eos_token_id (int or list) joins ``eos_token_ids``
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from lmstack.errors import LmstackError
from lmstack.tokenizer.chat import (
    ChatEncoding, assistant_spans, mask_from_offsets, normalize_messages, pick_template, render_continuation,
    render_template,
)
from lmstack.tokenizer.pretokenize import KNOWN_END_MARKERS
from lmstack.tokenizer.stream import StreamDecoder

log = logging.getLogger(__name__)

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_str(v: Any) -> str | None:
    """tokenizer_config values are a string or a serialized AddedToken ``{"content": ...}``."""
    if v is None:
        return None
    if isinstance(v, dict):
        return v.get("content")
    return str(v)


class Tokenizer:
    """Encode/decode, special tokens, chat templates and loss masks. Build with :meth:`from_dir` or
    :func:`lmstack.tokenizer.train_tokenizer`."""

    def __init__(self, backend, config: dict | None = None, json_bytes: bytes | None = None,
                 generation_eos_ids: Sequence[int] = (), chat_template: Any = None):
        self._tk = backend  # tokenizers.Tokenizer
        self.config: dict = dict(config or {})
        self._json = json_bytes if json_bytes is not None else backend.to_str().encode("utf-8")
        self._chat_template = chat_template if chat_template is not None else self.config.get("chat_template")
        self._generation_eos = [int(i) for i in generation_eos_ids]
        self._fast = getattr(backend, "encode_batch_fast", None)  # tokenizers >= 0.21
        self._plain = None  # the same tokenizer without added tokens (built on first use by sanitize)
        self._vocab = backend.get_vocab(with_added_tokens=True)  # str -> id
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self._special_ids = {i for i, t in added.items() if t.special}
        self._skip_ids = frozenset(self._special_ids)  # what decode(skip_special_tokens=True) drops (as Rust does)
        self._added = {t.content: i for i, t in added.items()}
        self.special_tokens: dict[str, str] = {}  # "bos_token" -> "<|endoftext|>"
        for key in SPECIAL_KEYS:
            s = _token_str(self.config.get(key))
            if s is not None and s in self._vocab:
                self.special_tokens[key] = s
                self._special_ids.add(self._vocab[s])
            elif s is not None:
                log.warning("tokenizer_config.json names %s %r, which tokenizer.json does not have; ignoring it",
                            key, s)

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a Hugging Face tokenizer directory (``tokenizer.json`` + optional ``tokenizer_config.json``)."""
        from tokenizers import Tokenizer as _Backend

        path = Path(path)
        if path.is_file() and path.name in ("tokenizer.json", "tokenizer_config.json"):
            path = path.parent  # a file inside the directory was given
        if not path.is_dir():
            raise LmstackError(f"tokenizer directory {path} does not exist")
        tj = path / "tokenizer.json"
        if not tj.is_file():
            hint = ""
            if (path / "tokenizer.model").exists():
                hint = (" (it has a SentencePiece tokenizer.model: convert it once with transformers: "
                        "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
            raise LmstackError(f"{path}: no tokenizer.json{hint}; train one with `lmstack tokenizer train`")
        from lmstack.utils.io import check_size  # lazily: lmstack.utils loads rich

        check_size(tj, error=LmstackError)
        raw = tj.read_bytes()
        try:
            backend = _Backend.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a generic Exception on bad JSON / unknown model
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise LmstackError(f"{tj}: cannot be read as a Hugging Face tokenizer ({why})") from None
        config = _read_json_obj(path / "tokenizer_config.json")
        template = config.get("chat_template")
        legacy = _read_json_obj(path / "chat_template.json")  # processor-style file of multimodal models
        if legacy.get("chat_template"):
            template = legacy["chat_template"]
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        named = path / "additional_chat_templates"
        if named.is_dir():
            extra = {p.stem: p.read_text(encoding="utf-8") for p in sorted(named.glob("*.jinja"))}
            if extra:
                base = template if isinstance(template, dict) else (
                    {t["name"]: t["template"] for t in template} if isinstance(template, list)
                    else ({"default": template} if template else {}))
                template = {**base, **extra}
        gen_eos: list[int] = []
        gen = _read_json_obj(path / "generation_config.json")
        eos = gen.get("eos_token_id")
        if eos is not None:
            gen_eos = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        return cls(backend, config, raw, gen_eos, template)

    def with_added_tokens(self, tokens: Sequence[str], special: bool = True) -> "Tokenizer":
        """A new tokenizer with ``tokens`` added after the current ids (existing ids unchanged), e.g. new chat
        markers before fine-tuning. The model's embedding must then grow to the new ``vocab_size``.
        Tokens already in the vocabulary are left as they are. ``special`` tokens are skipped by
        ``decode(skip_special_tokens=True)`` and count as control tokens for ``sanitize``."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _Backend

        backend = _Backend.from_str(self._json.decode("utf-8"))
        new = [t for t in dict.fromkeys(tokens) if t not in self._vocab]
        # ids continue after the largest existing id (tokenizers would reuse the model's size otherwise)
        added = [AddedToken(t, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
                 for t in new]
        (backend.add_special_tokens if special else backend.add_tokens)(added)
        cfg = json.loads(json.dumps(self.config))
        dec = cfg.setdefault("added_tokens_decoder", {})
        for t in new:
            dec[str(backend.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": special}
        if special:
            extra = cfg.get("additional_special_tokens") or []
            cfg["additional_special_tokens"] = [*extra, *[t for t in new if t not in extra]]
        return Tokenizer(backend, cfg, None, self._generation_eos, self._chat_template)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (the exact bytes this tokenizer was loaded from) + ``tokenizer_config.json``."""
        from lmstack.utils.io import atomic_write, atomic_write_json, atomic_write_text

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / "tokenizer.json", "wb") as f:
            f.write(self._json)
        cfg = dict(self.config)
        if isinstance(self._chat_template, dict):
            cfg["chat_template"] = [{"name": k, "template": v} for k, v in self._chat_template.items()]
        elif self._chat_template is not None:
            cfg["chat_template"] = self._chat_template
        atomic_write_json(out / "tokenizer_config.json", cfg)
        # A template file left in the directory by an earlier tokenizer would win over the config when loading:
        # keep it in step with this tokenizer's template instead of leaving it stale.
        default = None
        if isinstance(self._chat_template, dict):
            default = self._chat_template.get("default") or next(iter(self._chat_template.values()), None)
        elif self._chat_template:
            default = self._chat_template
        for name in ("chat_template.jinja", "chat_template.json"):
            if (out / name).exists():
                if default is None:
                    (out / name).unlink()
                elif name.endswith(".jinja"):
                    atomic_write_text(out / name, default)
                else:
                    atomic_write_json(out / name, {"chat_template": default})
        return out

    @property
    def sha256(self) -> str:
        """Hex sha256 of the ``tokenizer.json`` bytes: token shards record it, training checks it."""
        return hashlib.sha256(self._json).hexdigest()

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer`` (for offsets, truncation, ...)."""
        return self._tk

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids (max id + 1, added tokens included): the embedding table must be at least this big."""
        return max(self._vocab.values()) + 1 if self._vocab else 0

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(int(i))

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _named_id(self, key: str) -> int | None:
        s = self.special_tokens.get(key)
        return None if s is None else self._vocab[s]

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._named_id("unk_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: eos, chat end markers present as added tokens, generation_config ids."""
        ids: list[int] = []
        for i in [self.eos_token_id, *self._generation_eos, *(self._added.get(m) for m in KNOWN_END_MARKERS)]:
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    @property
    def special_token_ids(self) -> set[int]:
        """Ids of special added tokens and of the named special tokens (bos/eos/pad/unk...)."""
        return set(self._special_ids)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens`` runs the tokenizer's post-processor (e.g. Llama's bos)."""
        if self._fast is not None:  # no character offsets computed: ~1.5x faster than Tokenizer.encode
            return self._fast([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads; ``RAYON_NUM_THREADS`` caps them)."""
        encs = (self._fast or self._tk.encode_batch)(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False):
        """(ids, [(char_start, char_end), ...])."""
        enc = self._tk.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self._tk.decode_batch([[int(i) for i in ids] for ids in batch], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """Incremental decoder: ``.step(id) -> str`` text delta (never a split character), ``.flush() -> str``."""
        skip = self._skip_ids if skip_special_tokens else frozenset()  # exactly what decode() skips
        return StreamDecoder(lambda ids: self._tk.decode(list(ids), skip_special_tokens=False), skip)

    # ------------------------------------------------------------------ chat

    @property
    def chat_template(self) -> str | dict | None:
        return self._chat_template

    def get_chat_template(self, name: str | None = None, tools: Any = None) -> str:
        t = pick_template(self._chat_template, name, tools)
        if not t:
            raise LmstackError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja); "
                               "pass chat_template=... or use a tokenizer trained by lmstack")
        return t

    def _template_vars(self, variables: dict) -> dict:
        kw: dict[str, Any] = dict(self.special_tokens)
        kw.update(variables)
        return kw

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, chat_template: str | None = None,
                            tools: list[dict] | None = None, continue_final_message: bool = False,
                            sanitize: bool = False, **variables: Any) -> str | list[int]:
        """Render ``messages`` with the jinja chat template (transformers semantics); ids when ``tokenize``.

        ``continue_final_message``: leave the last message open (no end marker) so generation continues it.
        ``sanitize`` (with ``tokenize``): control tokens inside the messages are encoded as plain text
        (transformers' ``sanitize_control_tokens``)."""
        if sanitize:
            if not tokenize:
                raise LmstackError("sanitize=True needs tokenize=True (it changes ids, not text)")
            return self.render_chat(messages, add_generation_prompt, chat_template, tools, continue_final_message,
                                    sanitize=True, **variables).input_ids
        template = chat_template or self.get_chat_template(tools=tools)
        kw = self._template_vars({"tools": tools, **variables})
        if continue_final_message:
            if add_generation_prompt:
                raise LmstackError("continue_final_message and add_generation_prompt cannot both be set")
            text = render_continuation(template, messages, **kw)
        else:
            text, _ = render_template(template, messages, add_generation_prompt, **kw)
        return self.encode(text) if tokenize else text

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                    chat_template: str | None = None, tools: list[dict] | None = None,
                    continue_final_message: bool = False, sanitize: bool = False, **variables: Any) -> ChatEncoding:
        """Ids of the rendered conversation and a loss mask: 1 on assistant content + its end marker, else 0.

        With ``continue_final_message`` the text stops inside the last (assistant) message, masked up to there.
        With ``sanitize`` control tokens typed inside messages/tools are encoded as plain text."""
        template = chat_template or self.get_chat_template(tools=tools)
        specials = [self._tk.id_to_token(i) for i in self._special_ids]
        controls: tuple[str, ...] = ()
        if sanitize:
            from lmstack.tokenizer.sanitize import control_tokens, mark

            added = {t: (i in self._special_ids) for t, i in self._added.items()}
            controls = control_tokens(added, template)
            messages = mark(normalize_messages(messages), controls)
            tools, variables = mark(tools, controls), mark(variables, controls)
        kw = self._template_vars({"tools": tools, **variables})
        text, spans = assistant_spans(template, messages, add_generation_prompt and not continue_final_message,
                                      special_tokens=specials, **kw)
        if continue_final_message:
            if add_generation_prompt:
                raise LmstackError("continue_final_message and add_generation_prompt cannot both be set")
            cut = render_continuation(template, messages, **kw)
            if not text.startswith(cut):
                raise LmstackError("continue_final_message: the template renders earlier turns differently when "
                                   "the last message is open; cannot build a loss mask")
            text = cut
            spans = [(a, min(b, len(cut))) for a, b in spans if a < len(cut)]
        if sanitize:
            from lmstack.tokenizer.sanitize import encode_marked

            ids, offsets, text, spans = encode_marked(text, controls, self.encode_with_offsets, self._encode_plain,
                                                      self.token_to_id, spans)
        else:
            ids, offsets = self.encode_with_offsets(text)
        return ChatEncoding(ids, mask_from_offsets(offsets, spans), text, spans)

    def _encode_plain(self, text: str):
        """(ids, offsets) of ``text`` with no added token matched (they come out as ordinary pieces)."""
        if self._plain is None:
            from tokenizers import Tokenizer as _Backend

            spec = json.loads(self._json)
            spec["added_tokens"] = []
            self._plain = _Backend.from_str(json.dumps(spec))
        enc = self._plain.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_id}, "
                f"pad={self.pad_token_id}, sha256={self.sha256[:12]})")


def _read_json_obj(path: Path) -> dict:
    if not path.is_file():
        return {}
    from lmstack.utils.io import check_size

    check_size(path, error=LmstackError)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmstackError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); fix or delete the file") from None
    if not isinstance(obj, dict):
        raise LmstackError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
