"""Constrained decoding: JSON, JSON Schema, regex, grammars (GBNF / Lark) and choice lists via llguidance.

The grammar engine is ``llguidance`` (Microsoft's; the engine behind vLLM's and SGLang's ``guidance`` backend):
an Earley parser over a derivative-based regex lexer that computes the set of allowed next tokens from a token
trie in tens of microseconds. lmstack writes only the glue:

* :func:`vocab_bytes` — the tokenizer's vocabulary as the bytes each token stands for, read from
  ``tokenizer.json``: byte-level BPE (GPT-2's byte-to-unicode alphabet: lmstack's tokenizers, Llama 3, Qwen2),
  SentencePiece-style BPE (``▁`` for a space, ``<0xNN>`` byte-fallback pieces: Llama 2, Mistral), added
  tokens (special ones are never allowed by a grammar; the end-of-sequence ids are, once the grammar is complete);
* :class:`GrammarBackend` — one per tokenizer: compiles a :class:`~lmstack.serve.types.StructuredOutput` to an
  llguidance grammar (validated, size-capped, cached) and builds per-sequence processors;
* :class:`GrammarProcessor` — the :class:`~lmstack.serve.logits.LogitsProcessor` that masks disallowed tokens to
  ``-inf``. After each accepted token it starts the next mask on a worker thread (llguidance releases the GIL), so
  the mask is computed while the engine runs the next forward pass; the sampler only waits if it is not ready.

Reference: llguidance, https://github.com/guidance-ai/llguidance (docs/syntax.md for Lark, docs/json_schema.md).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable

import torch
from torch import Tensor

from lmstack.errors import LmstackError
from lmstack.serve.logits import LogitsProcessorFactory
from lmstack.serve.types import StructuredOutput

# Untrusted input is capped before it reaches the compiler (a 400 names the cap).
MAX_SPEC_BYTES = 64 * 1024  # a schema's JSON text, a grammar, a regex
MAX_CHOICES = 256
MAX_CHOICE_BYTES = 4096  # one choice
COMPILE_CACHE = 256  # compiled grammars kept per tokenizer (LRU)
# JSON is written as json.dumps writes it (", " and ": ", no other whitespace): what models were trained on, and a
# model cannot spend its max_tokens on blank lines. A schema's own "x-guidance" options override this.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class StructuredError(LmstackError):
    """A constraint that cannot be compiled (bad schema, grammar or regex, or over a cap): the API answers 400."""

    def __init__(self, message: str, kind: str = ""):
        super().__init__(message)
        self.kind = kind


# ----------------------------------------------------------------------------------------- vocabulary glue
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character each byte is written as -> the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _decoder_types(dec: dict | None) -> list[dict]:
    if not dec:
        return []
    if dec.get("type") == "Sequence":
        return [d for sub in dec.get("decoders", []) for d in _decoder_types(sub)]
    return [dec]


def tokenizer_json(tokenizer: Any) -> dict:
    """``tokenizer.json`` of an lmstack :class:`~lmstack.tokenizer.Tokenizer` or a transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "to_str"):
        backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise StructuredError("structured output needs a Hugging Face tokenizers (tokenizer.json) tokenizer")
    return json.loads(backend.to_str())


def vocab_bytes(spec: dict, n_vocab: int | None = None) -> tuple[list[bytes], list[int]]:
    """(bytes of every token id, the special token ids) from a parsed ``tokenizer.json``.

    Ids with no token (a model's embedding padded past the tokenizer) get ``b""``, which no grammar allows."""
    model = spec.get("model", {})
    vocab = model.get("vocab", {})
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        pieces = {p[0]: i for i, p in enumerate(vocab)}
    else:
        pieces = dict(vocab)
    decs = _decoder_types(spec.get("decoder"))
    types = {d.get("type") for d in decs}
    byte_level = "ByteLevel" in types
    byte_fallback = "ByteFallback" in types or bool(model.get("byte_fallback"))
    replace = [(d["pattern"].get("String"), d.get("content", "")) for d in decs
               if d.get("type") == "Replace" and isinstance(d.get("pattern"), dict) and d["pattern"].get("String")]
    if "Metaspace" in types:
        replace.append(("\u2581", " "))
    table = _byte_decoder() if byte_level else {}
    special: list[int] = []
    added: dict[int, bytes] = {}
    for t in spec.get("added_tokens", []):
        added[int(t["id"])] = t["content"].encode("utf-8")
        if t.get("special"):
            special.append(int(t["id"]))
    size = max([*pieces.values(), *added, -1]) + 1
    size = max(size, n_vocab or 0)
    out = [b""] * size
    for piece, i in pieces.items():
        if byte_level:
            out[i] = bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode("utf-8")
            continue
        m = _BYTE_FALLBACK.match(piece) if byte_fallback else None
        if m:
            out[i] = bytes([int(m.group(1), 16)])
            continue
        for a, b in replace:
            piece = piece.replace(a, b)
        out[i] = piece.encode("utf-8")
    for i, b in added.items():
        out[i] = b
    return out, special


class _TokenizerShim:
    """What ``llguidance.TokenizerWrapper`` reads: token bytes, ids, and an encoder (used for prompt healing and
    the greedy fallback; masks never call it)."""

    def __init__(self, tokens: list[bytes], eos: int, bos: int | None, special: list[int], encode):
        self.tokens, self.eos_token_id, self.bos_token_id, self.special_token_ids = tokens, eos, bos, special
        self._encode = encode

    def __call__(self, s: str | bytes) -> list[int]:
        return list(self._encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s))


# ----------------------------------------------------------------------------------------- compile
def _size(text: str, what: str) -> None:
    if len(text.encode("utf-8", "replace")) > MAX_SPEC_BYTES:
        raise StructuredError(f"the {what} is over {MAX_SPEC_BYTES // 1024} KiB; send a smaller one", what)


def grammar_text(so: StructuredOutput) -> str:
    """The llguidance grammar (JSON text) for a constraint; raises StructuredError for what cannot compile."""
    import llguidance as llg

    kind, spec = so.kind, so.spec
    if kind == "python":
        raise StructuredError("python mode is a syntax guard, not a grammar (lmstack.serve.python_syntax)", kind)
    if kind in ("json", "json_object"):
        return llg.LLMatcher.grammar_from_json_schema({} if kind == "json" else {"type": "object"},
                                                      defaults=JSON_OPTIONS)
    _size(spec, {"json_schema": "JSON schema", "regex": "regex", "choice": "choice list"}.get(kind, "grammar"))
    if kind == "json_schema":
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as e:
            raise StructuredError(f"the JSON schema is not valid JSON: {e.msg} at character {e.pos}", kind) from None
        if not isinstance(schema, (dict, bool)):
            raise StructuredError("the JSON schema must be an object", kind)
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema if isinstance(schema, dict) else {},
                                                          defaults=JSON_OPTIONS)
        except ValueError as e:
            raise StructuredError(f"invalid JSON schema: {e}", kind) from None
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        try:
            options = json.loads(spec)
        except json.JSONDecodeError:
            options = None
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
            raise StructuredError("choice must be a non-empty list of non-empty strings", kind)
        if len(options) > MAX_CHOICES:
            raise StructuredError(f"choice has {len(options)} options; at most {MAX_CHOICES}", kind)
        if any(len(o.encode("utf-8", "replace")) > MAX_CHOICE_BYTES for o in options):
            raise StructuredError(f"a choice is over {MAX_CHOICE_BYTES} bytes", kind)
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))
    if kind in ("grammar", "lark"):
        if kind == "grammar":
            from llguidance.gbnf_to_lark import any_to_lark

            try:
                spec = any_to_lark(spec)  # GBNF (llama.cpp) -> Lark; Lark text passes through
            except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions
                raise StructuredError(f"invalid grammar: {str(e).splitlines()[0][:300]}", kind) from None
        return llg.LLMatcher.grammar_from_lark(spec)
    raise StructuredError(f"unknown structured output kind {kind!r}", kind)


def _first_line(msgs: Iterable[str]) -> str:
    text = " ".join(m.strip() for m in msgs)
    return re.sub(r"\s+", " ", text)[:400]


class GrammarBackend:
    """llguidance bound to one tokenizer (and the model's vocabulary size and end-of-sequence ids)."""

    def __init__(self, tokenizer: Any, n_vocab: int, eos_ids: Iterable[int], forcing: bool = True):
        import llguidance as llg

        self.llg = llg
        # forcing (llguidance's default): where the grammar fixes the next bytes, only the tokens the tokenizer
        # would use for them are allowed (canonical tokenization: the model sees text as it was trained on, not
        # "<tool_c" + "a" + "ll>"). A deliberate subset of every token that keeps a valid prefix; False gives the
        # full set (the brute-force test compares both)
        self.forcing = forcing
        spec = tokenizer_json(tokenizer)
        tokens, special = vocab_bytes(spec, n_vocab)
        self.n_vocab = len(tokens)
        self.eos_ids = sorted(int(e) for e in eos_ids if 0 <= int(e) < self.n_vocab)
        if not self.eos_ids:
            raise StructuredError("structured output needs an end-of-sequence token; the model names none")
        special = sorted(set(special) | set(self.eos_ids))
        encode = getattr(tokenizer, "encode")
        shim = _TokenizerShim(tokens, self.eos_ids[0], getattr(tokenizer, "bos_token_id", None), special,
                              lambda s: encode(s, add_special_tokens=False))
        self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(shim), eos_token=self.eos_ids)
        self.limits = llg.LLParserLimits(max_grammar_size=200_000, initial_lexer_fuel=2_000_000)
        self._cache: OrderedDict[StructuredOutput, str] = OrderedDict()
        self._templates: OrderedDict[StructuredOutput, Any] = OrderedDict()  # a fresh matcher per constraint
        self._lock = threading.Lock()

    def compile(self, so: StructuredOutput) -> str:
        """The validated grammar for ``so`` (cached); raises StructuredError with the compiler's reason."""
        with self._lock:
            g = self._cache.get(so)
            if g is not None:
                self._cache.move_to_end(so)
                return g
        g = grammar_text(so)
        if not self.forcing:
            spec = json.loads(g)
            for sub in spec.get("grammars", []):
                if sub.get("lark_grammar"):
                    sub["lark_grammar"] = '%llguidance {"no_forcing": true}\n' + sub["lark_grammar"]
            g = json.dumps(spec)
        is_error, msgs = self.llg.LLMatcher.validate_grammar_with_warnings(g, self.tokenizer, limits=self.limits)
        if is_error:
            what = {"json_schema": "JSON schema", "regex": "regex", "choice": "choice list"}.get(so.kind, "grammar")
            raise StructuredError(f"invalid {what}: {_first_line(msgs)}", so.kind)
        with self._lock:
            self._cache[so] = g
            while len(self._cache) > COMPILE_CACHE:
                self._cache.popitem(last=False)
        return g

    def matcher(self, grammar: str):
        m = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        if m.is_error():
            raise StructuredError(f"invalid grammar: {_first_line([m.get_error()])}")
        return m

    def factory(self, so: StructuredOutput) -> LogitsProcessorFactory:
        """Compile once (cached); each call of the result is a fresh processor for one sequence."""
        with self._lock:
            template = self._templates.get(so)
        if template is None:
            template = self.matcher(self.compile(so))
            with self._lock:
                self._templates[so] = template
                while len(self._templates) > COMPILE_CACHE:
                    self._templates.popitem(last=False)

        def make() -> GrammarProcessor:
            return GrammarProcessor(template.deep_copy(), self.n_vocab, self.eos_ids)

        return make


_BACKENDS: dict[int, tuple[Any, GrammarBackend]] = {}
_BACKENDS_LOCK = threading.Lock()


def backend_for(tokenizer: Any, n_vocab: int, eos_ids: Iterable[int]) -> GrammarBackend:
    """The backend of this tokenizer object (built once: reading a 150K vocabulary takes ~0.5 s)."""
    key = id(tokenizer)
    eos = tuple(sorted(eos_ids))
    with _BACKENDS_LOCK:
        hit = _BACKENDS.get(key)
        if hit is not None and hit[0] is tokenizer and hit[1].n_vocab >= n_vocab and tuple(hit[1].eos_ids) == eos:
            return hit[1]
    b = GrammarBackend(tokenizer, n_vocab, eos)
    with _BACKENDS_LOCK:
        _BACKENDS[key] = (tokenizer, b)
    return b


# ----------------------------------------------------------------------------------------- the processor
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lmstack-grammar")
_BITS = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32)  # bit i of an int32 word


def unpack_bitmask(words: Tensor, n: int) -> Tensor:
    """(W,) int32 bitmask, bit j of word i = token 32*i + j -> (n,) bool allowed."""
    return ((words[:, None] & _BITS) != 0).reshape(-1)[:n]


class GrammarProcessor:
    """Masks every token the grammar does not allow next; advances on each accepted token.

    The mask for step t+1 is computed on a worker thread right after ``accept`` (overlapping the forward
    pass); ``__call__`` waits for it only if it is not done. ``mask_seconds`` sums the time spent computing
    masks (the benchmark reads it)."""

    def __init__(self, matcher: Any, n_vocab: int, eos_ids: list[int]):
        self.m = matcher
        self.n_vocab = n_vocab
        self.eos_ids = eos_ids
        self.words = torch.zeros((n_vocab + 31) // 32, dtype=torch.int32)
        self.banned = torch.zeros(n_vocab, dtype=torch.bool)
        self.mask_seconds = 0.0
        self.masks = 0
        self.finished = False
        self._accepting = bool(matcher.is_accepting())
        self._pending: Future | None = _POOL.submit(self._fill)

    @property
    def satisfied(self) -> bool:
        """Whether the text so far is complete under the grammar. Read from a flag that ``accept`` sets, never from
        the matcher: a worker thread may be computing the next mask on it right now."""
        return self.finished or self._accepting

    def _fill(self) -> None:
        """The next mask: llguidance's bitmask (GIL released), unpacked to a (V,) bool "banned" row here on the
        worker, so the sampler's part is one masked_fill."""
        t0 = time.perf_counter()
        self.m.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
        if self.m.is_error():  # cannot happen with the mask applied; end the sequence rather than emit garbage
            banned = torch.ones(self.n_vocab, dtype=torch.bool)
            banned[self.eos_ids] = False
        else:
            banned = ~unpack_bitmask(self.words, self.n_vocab)
        self.banned = banned
        self.mask_seconds += time.perf_counter() - t0
        self.masks += 1

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def __call__(self, logits: Tensor, seq: Any = None) -> Tensor:
        self._wait()
        V = logits.shape[0]
        banned = self.banned
        if V != banned.shape[0]:  # the model's rows past the tokenizer's: never allowed
            banned = torch.cat([banned, torch.ones(max(0, V - banned.shape[0]), dtype=torch.bool)])[:V]
        return logits.masked_fill_(banned.to(logits.device, non_blocking=True), float("-inf"))

    def accept(self, token_id: int) -> None:
        self._wait()
        if token_id in self.eos_ids:
            self.finished = self.finished or self._accepting
            return
        self.m.consume_token(int(token_id))
        self._accepting = bool(self.m.is_accepting()) and not self.m.is_error()
        self._pending = _POOL.submit(self._fill)

    def allowed_ids(self) -> list[int]:
        """The token ids allowed next (tests compare this with a brute-force check)."""
        self._wait()
        return (~self.banned).nonzero().flatten().tolist()
