"""OpenAI request bodies (pydantic) and their translation to :class:`SamplingParams`.

Field names and defaults follow the OpenAI API reference (``/v1/chat/completions``, ``/v1/completions``);
lmstack extras (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ...) arrive at the top
level of the JSON body, which is where the ``openai`` client's ``extra_body=`` puts them (vLLM does the same).

Structured output (``lmstack.serve.structured``): ``response_format`` (``json_object``, ``json_schema``) and the
extras ``regex`` / ``grammar`` / ``choice`` / ``json`` (also under vLLM's names ``guided_regex``,
``guided_grammar``, ``guided_choice``, ``guided_json``, or one ``structured_outputs`` object) — at most one
per request. ``logit_bias`` maps token ids (as strings, OpenAI's shape) to [-100, 100].

Policy for parameters we do not implement:

* would change the result (legacy ``functions``, ``suffix``, ``best_of`` > n, non-text modalities, ...) -> 400
  naming the parameter;
* harmless (``user``, ``store``, ``metadata``, ``service_tier``, unknown keys, ...) -> ignored and logged.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from lmstack.serve.api.errors import bad_request
from lmstack.serve.errors import InvalidSamplingParam
from lmstack.serve.types import CopyFrom, SamplingParams, StructuredOutput

log = logging.getLogger("lmstack.serve.api")


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers


def _doc(default: Any = None, **schema: Any) -> Any:
    """A field whose OpenAPI schema states its range; the check itself is this module's (a 400 naming the field,
    as OpenAI answers, rather than pydantic's 422)."""
    return Field(default, json_schema_extra=schema)


I64 = {"minimum": -(2 ** 63), "maximum": 2 ** 63 - 1}


class WatermarkRequest(_Body):
    """The ``watermark`` extra: a green-list watermark on this request's tokens (lmstack.serve.watermark)."""
    key: int | None = _doc(None, minimum=0, maximum=2 ** 63 - 1, description="default: the server's --watermark-key")
    gamma: float = _doc(0.25, exclusiveMinimum=0, exclusiveMaximum=1)
    delta: float = _doc(2.0, minimum=0, maximum=100)
    context_width: int = _doc(1, minimum=1, maximum=16)
    scheme: Literal["lmstack", "hf"] = "lmstack"


class CopyRequest(_Body):
    """The ``copy`` extra: grounded decoding (lmstack.serve.logits.CopyBias) -- a logit bonus for quoting these
    texts word for word (``bias``: continuing a quote; ``start_bias``: starting one at the answer's first token)."""
    texts: list[str] = Field(..., json_schema_extra={"maxItems": 256, "items": {"type": "string", "maxLength": 4000}})
    bias: float = _doc(4.0, minimum=0, maximum=100)
    start_bias: float = _doc(0.0, minimum=0, maximum=100)
    weights: list[float] | None = Field(None, description="one more bonus per text (a ranker's log-probabilities)",
                                        json_schema_extra={"maxItems": 256, "items": {"type": "number", "minimum": -100,
                                                                                      "maximum": 100}})


class _Sampling(_Body):
    """Fields shared by chat and completions (OpenAI's, then lmstack's extras)."""

    model: str = _doc(..., description="a served model name (GET /v1/models); any other: 404")
    n: int = _doc(1, minimum=1, maximum=128)
    temperature: float | None = _doc(None, minimum=0, maximum=2)
    top_p: float | None = _doc(None, exclusiveMinimum=0, maximum=1)
    presence_penalty: float = _doc(0.0, minimum=-2, maximum=2)
    frequency_penalty: float = _doc(0.0, minimum=-2, maximum=2)
    seed: int | None = _doc(None, **I64)
    stop: Union[str, list[str], None] = _doc(None, maxItems=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = _doc(None, minimum=1, maximum=2 ** 63 - 1)
    logit_bias: dict[str, float] | None = _doc(None, description="token id (as a string) -> bias in [-100, 100]",
                                               maxProperties=1024)
    # extras (extra_body=...)
    top_k: int = _doc(0, minimum=-1, maximum=2 ** 31 - 1)
    min_p: float = _doc(0.0, minimum=0, maximum=1)
    repetition_penalty: float = _doc(1.0, minimum=0.01, maximum=100)
    ignore_eos: bool = False
    min_tokens: int = _doc(0, minimum=0, maximum=2 ** 63 - 1)
    stop_token_ids: list[int] = Field(default_factory=list, json_schema_extra={"items": {"type": "integer",
                                                                                        "minimum": 0}})
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    cache_salt: str | None = None  # vLLM's: a private prefix-cache namespace inside the API key's own
    # structured output extras (lmstack's names, then vLLM's); at most one per request
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    json_schema: dict[str, Any] | None = _doc(None, description="extra: constrain the output to this JSON schema")
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    structured_outputs: dict[str, Any] | None = None
    # generation watermark extra: true (the server's key and settings) or an object (WatermarkRequest)
    watermark: Union[bool, WatermarkRequest, None] = None
    # grounded decoding extra: quoting these texts is made cheaper than paraphrasing them
    copy_texts: CopyRequest | None = Field(None, alias="copy")  # (named so as not to shadow BaseModel.copy)


# Accepted and ignored: they do not change what the model generates.
HARMLESS = {"user", "store", "metadata", "service_tier", "prompt_cache_key",
            "safety_identifier", "reasoning_effort", "verbosity"}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = _doc(None, minimum=0, maximum=20)
    max_completion_tokens: int | None = _doc(None, minimum=1, maximum=2 ** 63 - 1)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    add_generation_prompt: bool = True  # lmstack extra


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = _doc(None, minimum=0, maximum=5)
    echo: bool = False
    best_of: int | None = _doc(None, minimum=1, maximum=128, description="must equal n")
    suffix: str | None = None


def check_unsupported(req: _Sampling) -> None:
    """400 for parameters that would change behaviour; log and ignore the harmless rest."""
    if isinstance(req, ChatCompletionRequest):
        if req.functions:
            raise bad_request("functions (the legacy function-calling API) is not supported; send tools.",
                              param="functions")
        if req.function_call not in (None, "none", "auto"):
            raise bad_request("function_call is not supported; send tool_choice.", param="function_call")
        if req.modalities and set(req.modalities) != {"text"}:
            raise bad_request("only the 'text' modality is supported.", param="modalities")
        if req.audio is not None:
            raise bad_request("audio output is not supported.", param="audio")
        if req.prediction is not None:
            raise bad_request("predicted outputs are not supported.", param="prediction")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise bad_request("suffix (fill-in-the-middle) is not supported by this server.", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of different from n is not supported; set best_of = n or omit it.",
                              param="best_of")
    extra = sorted(set(req.model_extra or {}) | (HARMLESS & req.model_fields_set))
    if extra:
        log.info("ignoring parameters with no effect here: %s", ", ".join(extra))


def utf8_size(text: str, param: str) -> int:
    """UTF-8 length of ``text``; 400 naming ``param`` for text that is not Unicode (a lone surrogate, which JSON's
    ``\\ud800`` escapes can carry and which no tokenizer can encode)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise bad_request(f"{param} is not valid Unicode text: a lone surrogate U+{ord(text[e.start]):04X} at "
                          f"character {e.start} (a JSON \\uD800-\\uDFFF escape must be one half of a pair); "
                          "send UTF-8 text.", param=param) from None


def message_text(msg: ChatMessage, index: int) -> str:
    """The message's text; content parts must be text (no images or audio on this server)."""
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    out = []
    for part in msg.content:
        if part.type != "text" or part.text is None:
            raise bad_request(f"messages[{index}].content: part type {part.type!r} is not supported; "
                              "only 'text'.", param=f"messages[{index}].content")
        out.append(part.text)
    return "".join(out)


def chat_messages(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], int]:
    """The conversation as template messages, and its UTF-8 size in bytes (every string checked)."""
    if not req.messages:
        raise bad_request("messages must contain at least one message.", param="messages")
    msgs, size = [], 0
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        text = message_text(m, i)
        size += utf8_size(text, f"messages[{i}].content")
        msg: dict[str, Any] = {"role": role, "content": text}
        if m.name is not None:
            size += utf8_size(m.name, f"messages[{i}].name")
            if role == "tool":
                msg["name"] = m.name
        if m.tool_calls:
            if role != "assistant":
                raise bad_request(f"messages[{i}]: only assistant messages carry tool_calls.",
                                  param=f"messages[{i}].tool_calls")
            size += utf8_size(json.dumps(m.tool_calls, ensure_ascii=False), f"messages[{i}].tool_calls")
            msg["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            size += utf8_size(m.tool_call_id, f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        msgs.append(msg)
    return msgs, size


# OpenAI's own limits on a request: the engine accepts more (n > 128 for pass@k, temperature > 2 offline),
# the API answers 400 as OpenAI does. Every other range is SamplingParams.validate's.
OPENAI_LIMITS = [
    ("n", lambda r: r.n <= 128, "n must be at most 128"),
    ("temperature", lambda r: r.temperature is None or r.temperature <= 2, "temperature must be in [0, 2]"),
    ("stop", lambda r: not isinstance(r.stop, list) or len(r.stop) <= 16, "stop accepts at most 16 sequences"),
    # the sampler divides positive logits by it in float32: a penalty near 0 turns them into inf, and the NaN
    # probabilities fail the engine step (of every request in the batch), so the server bounds it
    ("repetition_penalty", lambda r: 1e-2 <= r.repetition_penalty <= 1e2,
     "repetition_penalty must be in [0.01, 100]"),
]
# Below this a temperature is greedy (vLLM's _SAMPLING_EPS): logits divided by ~1e-45 in float32 are inf.
GREEDY_BELOW = 1e-5

INT64 = (-(2 ** 63), 2 ** 63 - 1)
INT32 = (-(2 ** 31), 2 ** 31 - 1)
# Integer fields and the range a value may have before any other check reads it: a JSON integer has no size,
# and a seed past 64 bits overflows torch's generator (a 500 before this check). Tighter ranges follow
# (SamplingParams.validate, OpenAI's limits, the context length).
INT_FIELDS = {"seed": INT64, "n": INT32, "max_tokens": INT64, "max_completion_tokens": INT64, "top_k": INT32,
              "min_tokens": INT64, "logprobs": INT32, "top_logprobs": INT32, "best_of": INT32}
FLOAT_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty")


def check_ranges(req: _Sampling, vocab_size: int | None) -> None:
    """400 naming the field for an integer outside the range it can have, a float that is not finite, a stop
    token id outside the vocabulary, or a string that is not Unicode."""
    for name, (lo, hi) in INT_FIELDS.items():
        v = getattr(req, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and not lo <= v <= hi:
            raise bad_request(f"{name} must be an integer in [{lo}, {hi}]; got {_short(v)}.", param=name)
    for name in FLOAT_FIELDS:
        v = getattr(req, name, None)
        if isinstance(v, float) and not math.isfinite(v):
            raise bad_request(f"{name} must be a finite number; got {v}.", param=name)
    for i, t in enumerate(req.stop_token_ids):
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise bad_request(f"stop_token_ids[{i}] = {_short(t)} is outside the vocabulary [0, {vocab_size}).",
                              param="stop_token_ids")
    for i, s in enumerate([req.stop] if isinstance(req.stop, str) else (req.stop or [])):
        utf8_size(s, "stop" if isinstance(req.stop, str) else f"stop[{i}]")
    if req.cache_salt is not None:
        utf8_size(req.cache_salt, "cache_salt")


def _short(v: int) -> str:
    t = str(v)
    return t if len(t) <= 24 else f"{t[:10]}...{t[-6:]} ({len(t)} digits)"


def watermark_processors(req: _Sampling, server: dict[str, Any] | None, vocab_size: int | None) -> list:
    """The request's watermark as ``SamplingParams.logits_processors`` (empty: none). ``server``: the server-wide
    settings (``lmstack serve --watermark-key``), which every request gets and none can turn off; a request's
    ``watermark: true`` uses them, an object overrides them field by field (its ``key`` or the server's)."""
    w = req.watermark
    if w is None or w is False:
        if w is False and server is not None:
            raise bad_request("this server watermarks every answer; watermark: false is refused.", param="watermark")
        w = True if server is not None else None
    if w is None:
        return []
    base = dict(server or {})
    if isinstance(w, WatermarkRequest):
        base.update({k: v for k, v in w.model_dump(exclude_unset=True).items() if v is not None})
    if base.get("key") is None:
        raise bad_request("watermark needs a key: send watermark.key, or start the server with --watermark-key.",
                          param="watermark")
    if not vocab_size:
        raise bad_request("watermark needs the model's vocabulary size, which this server does not know.",
                          param="watermark")
    from lmstack.serve.watermark import watermark_factory

    try:
        return [watermark_factory(vocab_size, key=int(base["key"]), gamma=float(base.get("gamma", 0.25)),
                                  delta=float(base.get("delta", 2.0)), context_width=int(base.get("context_width", 1)),
                                  scheme=str(base.get("scheme", "lmstack")))]
    except ValueError as e:
        raise bad_request(f"{e}.", param="watermark") from None


def sampling_params(req: _Sampling, *, max_tokens: int, logprobs: int | None,
                    logprobs_param: str = "logprobs", vocab_size: int | None = None,
                    cache_salt: str | None = None, structured: StructuredOutput | None = None,
                    watermark: dict[str, Any] | None = None) -> SamplingParams:
    """Translate the request to engine params, validated by :meth:`SamplingParams.validate`; a value out of
    range is a 400 naming the request field (``logprobs_param``: the field that carried ``logprobs``).
    ``watermark``: the server-wide watermark settings (:func:`watermark_processors`)."""
    for param, ok, msg in OPENAI_LIMITS:
        if not ok(req):
            raise bad_request(msg + ".", param=param)
    params = SamplingParams(
        n=req.n,
        temperature=1.0 if req.temperature is None else (0.0 if 0 <= req.temperature < GREEDY_BELOW
                                                         else req.temperature),
        top_p=1.0 if req.top_p is None else req.top_p,
        # -1 is vLLM's "off" spelling; k >= the vocabulary keeps every token: off too
        top_k=0 if req.top_k == -1 or (vocab_size is not None and req.top_k >= vocab_size) else req.top_k,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=min(req.min_tokens, max_tokens),
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        cache_salt=cache_salt,
        logit_bias=logit_bias(req, vocab_size),
        structured=structured,
        logits_processors=watermark_processors(req, watermark, vocab_size),
        copy=CopyFrom(tuple(c.texts), bias=c.bias, start_bias=c.start_bias,
                      weights=None if c.weights is None else tuple(c.weights)) if (c := req.copy_texts) else None,
    )
    try:
        params.validate()
    except InvalidSamplingParam as e:
        raise bad_request(f"{e}.", param=logprobs_param if e.param == "logprobs" else e.param) from None
    return params


MAX_LOGIT_BIAS = 1024


def logit_bias(req: _Sampling, vocab_size: int | None) -> dict[int, float] | None:
    """OpenAI's ``{"token id": bias}`` as ``{int: float}``; 400 for a key that is not a token id in the vocabulary or
    a value outside [-100, 100]."""
    if not req.logit_bias:
        return None
    if len(req.logit_bias) > MAX_LOGIT_BIAS:
        raise bad_request(f"logit_bias has {len(req.logit_bias)} entries; at most {MAX_LOGIT_BIAS}.",
                          param="logit_bias")
    out: dict[int, float] = {}
    for k, v in req.logit_bias.items():
        try:
            t = int(k)
        except ValueError:
            raise bad_request(f"logit_bias key {k[:40]!r} is not a token id.", param="logit_bias") from None
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise bad_request(f"logit_bias token id {t} is outside the vocabulary [0, {vocab_size}).",
                              param="logit_bias")
        if not (math.isfinite(v) and -100 <= v <= 100):
            raise bad_request(f"logit_bias[{k}] = {v} is outside [-100, 100].", param="logit_bias")
        out[t] = float(v)
    return out


def _schema_of(obj: Any, param: str) -> StructuredOutput:
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as e:
            raise bad_request(f"{param} is not valid JSON: {e.msg}.", param=param) from None
    if isinstance(obj, bool):
        obj = {}
    if not isinstance(obj, dict):
        raise bad_request(f"{param} must be a JSON schema object.", param=param)
    return StructuredOutput.schema(obj)


def _one(found: list[tuple[str, StructuredOutput]]) -> StructuredOutput | None:
    if len(found) > 1:
        raise bad_request(f"at most one output constraint per request; got {', '.join(p for p, _ in found)}.",
                          param=found[1][0])
    return found[0][1] if found else None


def structured_output(req: _Sampling) -> tuple[StructuredOutput | None, str]:
    """The request's output constraint (None: free text) and the parameter that carried it (for 400s)."""
    found: list[tuple[str, StructuredOutput]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        kind = rf.get("type", "text")
        if kind == "json_object":
            found.append(("response_format", StructuredOutput("json_object")))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js and "name" not in js:
                raise bad_request("response_format json_schema needs {\"json_schema\": {\"name\": ..., "
                                  "\"schema\": {...}}}.", param="response_format")
            found.append(("response_format", _schema_of(js.get("schema", {}), "response_format.json_schema.schema")))
        elif kind != "text":
            raise bad_request(f"response_format type {str(kind)[:40]!r} is not supported; 'text', 'json_object' or "
                              "'json_schema'.", param="response_format")
    for name in ("regex", "guided_regex"):
        if getattr(req, name) is not None:
            found.append((name, StructuredOutput.regex(getattr(req, name))))
    for name in ("grammar", "guided_grammar"):
        if getattr(req, name) is not None:
            found.append((name, StructuredOutput.grammar(getattr(req, name))))
    for name in ("choice", "guided_choice"):
        if getattr(req, name) is not None:
            found.append((name, StructuredOutput.choice(getattr(req, name))))
    for name in ("json_schema", "guided_json"):
        if getattr(req, name) is not None:
            found.append((name, _schema_of(getattr(req, name), name)))
    so = req.structured_outputs
    if so is not None:
        keys = {"json": None, "regex": StructuredOutput.regex, "grammar": StructuredOutput.grammar,
                "choice": StructuredOutput.choice}
        for k, v in so.items():
            if v is None or k in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                                  "whitespace_pattern"):
                continue
            param = f"structured_outputs.{k}"
            if k == "json":
                found.append((param, _schema_of(v, param)))
            elif k == "json_object":
                if v:
                    found.append((param, StructuredOutput("json_object")))
            elif k in keys:
                found.append((param, keys[k](v)))  # type: ignore[misc]
            else:
                raise bad_request(f"structured_outputs.{k[:40]} is not supported; json, regex, grammar, choice or "
                                  "json_object.", param="structured_outputs")
    one = _one(found)
    return one, (found[0][0] if found else "")


def chat_logprobs_k(req: ChatCompletionRequest) -> int | None:
    """OpenAI chat: ``logprobs: bool`` + ``top_logprobs: 0..20`` (which needs logprobs=true)."""
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs=true.", param="top_logprobs")
    if not req.logprobs:
        return None
    return req.top_logprobs or 0


def completion_logprobs_k(req: CompletionRequest) -> int | None:
    if req.logprobs is not None and not 0 <= req.logprobs <= 5:
        raise bad_request("logprobs must be in [0, 5] for completions.", param="logprobs")
    return req.logprobs


def completion_prompts(req: CompletionRequest) -> tuple[list[str | list[int]], list[int]]:
    """``prompt`` may be a string, a list of strings, a token list, or a list of token lists. Returns the prompts
    and the UTF-8 size in bytes of each (0 for token lists; every string checked)."""
    p = req.prompt
    if isinstance(p, str):
        return [p], [utf8_size(p, "prompt")]
    if not p:
        raise bad_request("prompt must not be empty.", param="prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)], [0]  # type: ignore[arg-type]
    out: list[str | list[int]] = []
    sizes: list[int] = []
    for i, x in enumerate(p):
        if isinstance(x, list) and not x:
            raise bad_request(f"prompt[{i}] is an empty token list.", param="prompt")
        sizes.append(utf8_size(x, f"prompt[{i}]") if isinstance(x, str) else 0)
        out.append(x)  # type: ignore[arg-type]
    return out, sizes
