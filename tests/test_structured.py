"""Constrained decoding in the engine (lmstack.serve.structured / logits / python_syntax).

The grammar engine's mask is checked against a brute force that knows nothing of llguidance: decode each token of
the vocabulary to bytes with the tokenizer itself, append it to the text so far, and ask the ``regex`` module
whether the result can still match (partial matching) — on random reachable states, for lmstack's byte-level BPE
and a Qwen2-style vocabulary (added ``<tool_call>`` tokens, special tokens). A tiny random model cannot write
JSON by itself: every constrained output parsing and validating is the constraint's doing.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import regex
import torch

from lmstack.serve.python_syntax import PythonSyntax, complete, viable
from lmstack.serve.structured import GrammarBackend, StructuredError, tokenizer_json, vocab_bytes
from lmstack.serve.types import SamplingParams, StructuredOutput
from lmstack.tokenizer import Tokenizer
from tests.serve_fixtures import tiny_model_dir
from tests.tokenizer_fixtures import corpus, write_qwen2_dir

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("structured") / "tiny", max_position_embeddings=512)


@pytest.fixture(scope="module")
def llm(model_dir):
    import lmstack.serve.llm as L

    return L.load(model_dir, max_num_seqs=32)


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
    return Tokenizer.from_dir(write_qwen2_dir(tmp_path_factory.mktemp("qwen2tok"), corpus(80)))


# ------------------------------------------------------------------------------------------ vocabulary glue
@pytest.mark.parametrize("which", ["lmstack", "qwen2"])
def test_vocab_bytes_match_the_tokenizer(which, model_dir, qwen_tok):
    tok = Tokenizer.from_dir(model_dir) if which == "lmstack" else qwen_tok
    tokens, special = vocab_bytes(tokenizer_json(tok), tok.vocab_size + 5)
    assert len(tokens) == tok.vocab_size + 5 and tokens[-1] == b""  # padded ids never match anything
    assert {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|im_start|>")} <= set(special)
    if which == "qwen2":
        assert tok.token_to_id("<tool_call>") not in special  # a non-special added token: plain text to a grammar
    checked = 0
    for i in range(tok.vocab_size):
        b = tokens[i]
        text = tok.decode([i])
        if "\ufffd" in text:  # a piece of a multi-byte character: decodes to the same replacement characters
            assert b and b.decode("utf-8", "replace") == text, (i, b, text)
            continue
        assert b == text.encode("utf-8"), (i, tok.id_to_token(i), b, text)
        checked += 1
    assert checked > tok.vocab_size // 2
    # multi-byte text: the bytes of its tokens concatenate to its UTF-8
    for s in ["naïve café 机器学习 🙂", "<tool_call>\n{\"a\": 1}\n</tool_call>"]:
        ids = tok.encode(s)
        assert b"".join(tokens[i] for i in ids) == s.encode("utf-8")


# ------------------------------------------------------------------------------------------ mask = brute force
PATTERNS = [
    r'\{"name": "[a-z ]{1,12}", "age": (0|[1-9][0-9]{0,2})\}',
    r"[0-9]{3}-[A-Za-z]{2,5}( ok)?",
    r"(yes|no|maybe so)",
    r"<tool_call>\n[a-z]+\n</tool_call>",
    r"(café|naïve|机器) [a-z]+",
]


def _viable(rx, data: bytes) -> bool:
    """Can ``data`` (bytes, maybe ending inside a UTF-8 character) grow into a match of ``rx``?"""
    try:
        return rx.fullmatch(data.decode("utf-8"), partial=True) is not None
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data" or len(data) - e.start > 3:
            return False  # invalid UTF-8, not just a character still to finish
        head, tail = data[:e.start].decode("utf-8"), data[e.start:]
        return any(rx.fullmatch(head + c, partial=True) for c in _completions(tail))


def _brute_force(tokens: list[bytes], special: set[int], eos: list[int], pattern: str, prefix: bytes) -> list[int]:
    """Every token id whose bytes keep ``prefix`` a viable prefix of the pattern; an end id when it matches whole."""
    rx = regex.compile(pattern)
    out = []
    for t, b in enumerate(tokens):
        if t in eos:
            try:
                if rx.fullmatch(prefix.decode("utf-8")):
                    out.append(t)
            except UnicodeDecodeError:
                pass
        elif t not in special and b and _viable(rx, prefix + b):
            out.append(t)
    return out


def _completions(head: bytes) -> list[str]:
    """Characters (in the patterns' alphabet) whose UTF-8 starts with ``head``."""
    return [c for c in "ïé机器学🙂" if c.encode("utf-8").startswith(head)]


@pytest.mark.parametrize("which", ["lmstack", "qwen2"])
def test_mask_equals_brute_force(which, model_dir, qwen_tok):
    """Without forcing the mask is exactly the brute-force set; with forcing (the default: where the grammar fixes
    the next bytes only their canonical tokens are allowed) it is a non-empty subset of it."""
    tok = Tokenizer.from_dir(model_dir) if which == "lmstack" else qwen_tok
    eos = [tok.token_to_id("<|im_end|>")]
    exact = GrammarBackend(tok, tok.vocab_size, eos, forcing=False)
    forced = GrammarBackend(tok, tok.vocab_size, eos)
    tokens, special = vocab_bytes(tokenizer_json(tok), tok.vocab_size)
    special_set = set(special)
    rng = random.Random(0)
    states = 0
    for pattern in PATTERNS:
        so = StructuredOutput.regex(pattern)
        for walk in range(4):
            proc, canon = exact.factory(so)(), forced.factory(so)()
            prefix = b""
            for _ in range(rng.randint(1, 14)):
                allowed = proc.allowed_ids()
                assert allowed == _brute_force(tokens, special_set, eos, pattern, prefix), (pattern, prefix)
                sub = canon.allowed_ids()
                assert sub and set(sub) <= set(allowed), (pattern, prefix)
                states += 1
                choices = [t for t in sub if t not in eos]  # walk states both reach
                if not choices:
                    break
                t = rng.choice(choices)
                proc.accept(t)
                canon.accept(t)
                prefix += tokens[t]
    assert states > 80


def test_compile_errors_and_caps(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    backend = GrammarBackend(tok, tok.vocab_size, [tok.token_to_id("<|im_end|>")])
    for so, words in [(StructuredOutput.schema({"type": "foo"}), "schema"),
                      (StructuredOutput.regex("a(b"), "regex"),
                      (StructuredOutput.grammar('root ::= "a" missing'), "grammar"),
                      (StructuredOutput("json_schema", "{not json"), "JSON"),
                      (StructuredOutput.choice([]), "choice"),
                      (StructuredOutput.choice(["x"] * 300), "at most"),
                      (StructuredOutput.regex("a" * 70_000), "KiB")]:
        with pytest.raises(StructuredError, match=words):
            backend.compile(so)
    # GBNF and Lark both compile
    backend.compile(StructuredOutput.grammar('root ::= "yes" | "no"'))
    backend.compile(StructuredOutput("lark", 'start: "a"+'))


# ------------------------------------------------------------------------------------------ through the engine
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


def test_constrained_and_free_in_one_batch(llm):
    free_alone = llm.generate(["The quick brown"], temperature=0, max_tokens=12)[0].outputs[0].token_ids
    params = dict(temperature=0.9, seed=3, max_tokens=120)
    eng = llm.engine
    reqs = [eng.add_request("Hello", SamplingParams(structured=StructuredOutput.schema(SCHEMA), **params)),
            eng.add_request("The quick brown", SamplingParams(temperature=0, max_tokens=12)),
            eng.add_request("Hello", SamplingParams(structured=StructuredOutput.choice(["red", "green"]), n=3,
                                                    **params)),
            eng.add_request("Serving", SamplingParams(structured=StructuredOutput.regex(r"[0-9]{2,4}-[a-z]{3}"),
                                                      **params))]
    final = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            final[out.request_id] = out
    js = final[reqs[0].request_id].outputs[0]
    jsonschema.validate(json.loads(js.text), SCHEMA)
    assert js.finish_reason == "stop" and js.constraint_satisfied is True
    free = final[reqs[1].request_id].outputs[0]
    assert free.token_ids == free_alone and free.constraint_satisfied is None  # the batch does not change it
    assert {o.text for o in final[reqs[2].request_id].outputs} <= {"red", "green"}
    assert len(final[reqs[2].request_id].outputs) == 3
    assert regex.fullmatch(r"[0-9]{2,4}-[a-z]{3}", final[reqs[3].request_id].outputs[0].text)


def test_json_modes_prefix_cache_streaming_and_kernel(llm):
    eng = llm.engine
    # the same prompt twice: the second reuses cached blocks; constrained output still valid
    so = StructuredOutput.schema(SCHEMA)
    for _ in range(2):
        out = llm.generate("Hello there, this prompt is long enough to fill a cached block or two of KV.",
                           temperature=1.0, seed=5, max_tokens=120, structured=so)[0]
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
    assert out.metrics.num_cached_prompt_tokens > 0
    streamed = "".join(llm.stream("Hello", temperature=1.0, seed=7, max_tokens=120, structured=so))
    jsonschema.validate(json.loads(streamed), SCHEMA)
    # free JSON (any value / any object): unbounded strings may run to max_tokens; what stops parses
    for kind, typ in [("json", object), ("json_object", dict)]:
        outs = llm.generate("Hi", temperature=1.0, seed=8, n=4, max_tokens=150,
                            structured=StructuredOutput(kind))[0].outputs
        for o in outs:
            if o.finish_reason == "stop":
                assert isinstance(json.loads(o.text), typ) and o.constraint_satisfied
            else:
                assert o.finish_reason == "length" and o.constraint_satisfied is False
        assert any(o.finish_reason == "stop" for o in outs)
    # decode steps go through the compiled CPU kernel when it runs here: the constraint applies to its logits
    if eng.runner.kernel is not None:
        kernel, calls = eng.runner.kernel, []

        class Spy:
            def __call__(self, batch):
                calls.append(len(batch))
                return kernel(batch)

            def __getattr__(self, name):
                return getattr(kernel, name)

        eng.runner.kernel = Spy()
        try:
            out = llm.generate("Hi", temperature=1.0, seed=9, max_tokens=120, structured=so)[0].outputs[0]
        finally:
            eng.runner.kernel = kernel
        assert calls and out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMA)
    else:
        assert isinstance(eng.kernel_reason, str)  # the eager path, and the reason why


def test_length_finish_says_the_constraint_is_incomplete(llm):
    out = llm.generate("Hello", temperature=0, max_tokens=4, structured=StructuredOutput.schema(SCHEMA))[0]
    o = out.outputs[0]
    assert o.finish_reason == "length" and o.constraint_satisfied is False
    with pytest.raises(json.JSONDecodeError):
        json.loads(o.text)


def test_logit_bias_and_constrained_logprobs(llm):
    base = llm.generate("Hello", temperature=0, max_tokens=1, logprobs=3)[0].outputs[0]
    top = base.token_ids[0]
    banned = llm.generate("Hello", temperature=0, max_tokens=1, logit_bias={top: -100.0})[0].outputs[0]
    assert banned.token_ids[0] != top
    forced = llm.generate("Hello", temperature=1.0, seed=0, max_tokens=3, logit_bias={42: 100.0})[0].outputs[0]
    assert forced.token_ids == [42, 42, 42]
    # under a choice of one token sequence the constrained distribution is certain: log-prob 0 on each step
    c = llm.generate("Hello", temperature=0, max_tokens=10, logprobs=2,
                     structured=StructuredOutput.choice(["yes"]))[0].outputs[0]
    assert c.text == "yes" and all(abs(lp.logprob) < 1e-5 for lp in c.logprobs[:-1])
    assert all(len(lp.top) == 1 for lp in c.logprobs[:-1])  # masked tokens are not listed as alternatives


# ------------------------------------------------------------------------------------------ python syntax
def test_python_viability():
    for src in ["def f(x):\n    return x +", "if x", "def f(", "x = 'ab", 'x = """ab', "print(1)\nprint(2",
                "def f(x):\n", "import", "x = [1, 2"]:
        assert viable(src), src
    for src in ["x = )", "x = 1 +* 2", "def f(x):\n    return x\n  y", "print(1))"]:
        assert not viable(src), src
    assert complete("def f(x):\n    return x + 1\n") and not complete("def f(x):\n    return (x")


def test_python_guard_masks_breaking_tokens(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    eos = tok.token_to_id("<|im_end|>")
    guard = PythonSyntax(tok, [eos], prefix="def add(a, b):\n", max_checks=tok.vocab_size, mass=1.0)
    for t in tok.encode("    return a"):
        guard.accept(t)
    logits = guard(torch.zeros(tok.vocab_size), None)
    allowed = set(torch.isfinite(logits).nonzero().flatten().tolist())
    close = tok.encode(")")[0]
    assert close not in allowed  # "return a)" can never parse
    assert tok.encode(" +")[0] in allowed and eos in allowed  # "return a" is complete: may end
    for t in tok.encode(" +"):
        guard.accept(t)
    assert guard.text == "    return a +"
    allowed = set(torch.isfinite(guard(torch.zeros(tok.vocab_size), None)).nonzero().flatten().tolist())
    assert eos not in allowed and not guard.satisfied  # "return a +" must go on


def test_python_mode_through_the_engine(llm):
    out = llm.generate("def add(a, b):\n", temperature=0.7, seed=1, max_tokens=40,
                       structured=StructuredOutput("python", "def add(a, b):\n"))[0].outputs[0]
    assert out.finish_reason in ("stop", "length")
    assert viable("def add(a, b):\n" + out.text)
