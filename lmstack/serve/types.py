"""The seams of the serving engine (vLLM's vocabulary, nano-vllm's size).

``SamplingParams`` goes in with each request; ``RequestOutput`` (with one ``CompletionOutput`` per
``n``) comes out, as a snapshot after every engine step while streaming and once more when finished.
The offline API (``lmstack.load(...).generate``), ``lmstack generate`` / ``chat`` and the HTTP server all
speak these types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from lmstack.errors import ConfigError
from lmstack.serve.errors import InvalidSamplingParam

if TYPE_CHECKING:
    from lmstack.serve.logits import LogitsProcessorFactory

FinishReason = Literal["stop", "length", "abort", "error"]  # error: non-finite logits (engine.step)
StructuredKind = Literal["json", "json_object", "json_schema", "regex", "grammar", "lark", "choice", "python"]
STRUCTURED_KINDS = ("json", "json_object", "json_schema", "regex", "grammar", "lark", "choice", "python")


COPY_MAX_TEXTS, COPY_MAX_CHARS = 256, 4000


@dataclass(frozen=True)
class CopyFrom:
    """Grounded decoding (:class:`lmstack.serve.logits.CopyBias`): the texts an answer may quote (the retrieved
    passages, or their answer units), a logit bonus for the token that continues the quote the output is in
    (``bias``) and one for the first token of any text at the start of the answer (``start_bias``). The model
    still writes every token; a quote is only made cheaper than a paraphrase."""

    texts: tuple[str, ...]
    bias: float = 4.0
    start_bias: float = 0.0
    weights: tuple[float, ...] | None = None  # one more bonus per text, e.g. a ranker's log-probabilities

    def problem(self) -> str | None:
        """What is wrong with it, or None."""
        if not isinstance(self.texts, tuple) or not all(isinstance(t, str) for t in self.texts):
            return "copy.texts must be a tuple of strings"
        if len(self.texts) > COPY_MAX_TEXTS or any(len(t) > COPY_MAX_CHARS for t in self.texts):
            return f"copy takes at most {COPY_MAX_TEXTS} texts of at most {COPY_MAX_CHARS} characters each"
        if not (0 <= self.bias <= 100 and 0 <= self.start_bias <= 100):
            return "copy.bias and copy.start_bias must be in [0, 100]"
        if self.weights is not None:
            if not isinstance(self.weights, tuple) or len(self.weights) != len(self.texts):
                return "copy.weights must be a tuple with one number per text"
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and -100 <= w <= 100
                       for w in self.weights):
                return "copy.weights must be numbers in [-100, 100]"
        return None


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a request's output, compiled by ``lmstack.serve.structured`` (llguidance).

    ``kind``: ``json`` (any JSON value), ``json_object`` (any JSON object: OpenAI's ``json_object`` mode),
    ``json_schema`` (``spec`` = the schema as JSON text), ``regex``, ``grammar`` (GBNF or Lark/EBNF text),
    ``lark``, ``choice`` (``spec`` = a JSON list of strings), ``python`` (syntactically valid Python code).
    Build with the class methods: ``StructuredOutput.schema({...})``, ``.regex(r"...")``, ``.choice([...])``."""

    kind: StructuredKind
    spec: str = ""

    @classmethod
    def schema(cls, schema: dict[str, Any] | str) -> "StructuredOutput":
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True))

    @classmethod
    def regex(cls, pattern: str) -> "StructuredOutput":
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, text: str) -> "StructuredOutput":
        return cls("grammar", text)

    @classmethod
    def choice(cls, options: list[str]) -> "StructuredOutput":
        return cls("choice", json.dumps(list(options)))


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style: divides positive logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI style, over generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed, same text
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the top-k alternatives
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # prefix-cache namespace (vLLM's cache_salt): requests with different salts never share cached KV blocks, so
    # neither cached_tokens nor time-to-first-token tells one tenant what another sent. None: the shared namespace
    cache_salt: str | None = None
    # the per-request logits step (lmstack.serve.logits): applied in this order before penalties and sampling
    logit_bias: dict[int, float] | None = None  # token id -> added logit, [-100, 100] (OpenAI's)
    structured: StructuredOutput | None = None  # JSON / JSON Schema / regex / grammar / choice / Python
    logits_processors: list["LogitsProcessorFactory"] = field(default_factory=list)  # one fresh per sequence
    copy: CopyFrom | None = None  # grounded decoding: a bonus for quoting these texts (lmstack.serve.logits.CopyBias)

    @classmethod
    def from_kwargs(cls, **kw) -> "SamplingParams":
        """Build from keyword arguments; accepts ``max_new_tokens`` for ``max_tokens`` and a single ``stop``
        string. Unknown names raise ConfigError listing the allowed ones."""
        if "max_new_tokens" in kw:
            kw["max_tokens"] = kw.pop("max_new_tokens")
        names = {f.name for f in fields(cls)}
        bad = sorted(set(kw) - names)
        if bad:
            raise ConfigError(f"unknown sampling parameter(s) {', '.join(bad)}; allowed: {', '.join(sorted(names))}")
        p = cls(**kw)
        p.validate()
        return p

    def validate(self) -> None:
        """The one place the ranges are checked (the offline API, the engine and the HTTP server all call it);
        raises :class:`InvalidSamplingParam` naming the field. Normalizes ``stop`` (a string, None) to a list."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        checks = [
            ("n", self.n >= 1, "n must be >= 1"),
            ("temperature", self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            ("min_p", 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            ("max_tokens", self.max_tokens >= 1, "max_tokens must be >= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
            ("logit_bias", self.logit_bias is None or all(
                isinstance(k, int) and k >= 0 and -100 <= float(v) <= 100 for k, v in self.logit_bias.items()),
             "logit_bias maps token ids (>= 0) to values in [-100, 100]"),
            ("structured", self.structured is None or (isinstance(self.structured, StructuredOutput)
                                                       and self.structured.kind in STRUCTURED_KINDS),
             f"structured must be a StructuredOutput of kind {', '.join(STRUCTURED_KINDS)}"),
            ("logits_processors", all(callable(f) for f in self.logits_processors),
             "logits_processors must be factories (callables returning a LogitsProcessor)"),
            ("copy", self.copy is None or (isinstance(self.copy, CopyFrom) and self.copy.problem() is None),
             (self.copy.problem() if isinstance(self.copy, CopyFrom) else "copy must be a CopyFrom") or ""),
        ]
        for param, ok, msg in checks:
            if not ok:
                got = "" if param == "copy" else f"; got {getattr(self, param)!r}"  # (texts can be long)
                raise InvalidSamplingParam(param, f"{msg}{got}")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # the top-k alternatives (token id -> logprob)


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    delta_text: str = ""  # text added since the previous snapshot (streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    # with a constraint (structured output): whether the text is a complete instance of it (a JSON object that
    # a max_tokens cut left open: False). None: the request had no constraint
    constraint_satisfied: bool | None = None


@dataclass
class RequestMetrics:
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_prompt_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
