"""A syntax guard for generated Python: every step keeps the code a prefix of some valid program, and the
sequence may only end when the whole text parses.

Python's grammar is indentation-sensitive (INDENT / DEDENT tokens from a stateful tokenizer), which no
context-free grammar engine expresses directly, so this is the second mechanism the design allows: incremental
checks with CPython's own parser. For the next token the guard walks the candidates in order of probability
and keeps those after which the code is still *viable* — it compiles, or CPython reports ``incomplete input``
(``PyCF_ALLOW_INCOMPLETE_INPUT``, what ``codeop`` uses for the REPL), or the only error is at the very end of
the text or an unterminated string on the line being written — until the kept candidates cover ``mass`` of the
probability or ``max_checks`` candidates were tried (when none of those is viable it goes on down the ranking, up
to ``max_fallback`` candidates, to the first viable one); every other token is masked. End-of-sequence is viable only
when the whole code compiles and, when the output continues a prefix, the output has added a line of code (a
signature with its docstring already compiles: ending there would be an empty completion). Checking before a token is taken is the backtracking: a candidate that would break
the code is never sampled, so nothing has to be undone. When no tried candidate is viable the row is left as
it is (the guard cannot help there) and ``satisfied`` reports whether the final text parses.

Stop strings and stop token ids count as ends too: a token whose text completes one of the request's ``stop`` strings
(the engine then cuts the output before it) is viable only when the code up to the stop string compiles, and a
``stop_token_ids`` token only when the whole code compiles — so with pass@k's stop strings (``"\ndef "`` ...) a
completion that ends on one parses together with its prompt. Only a ``max_tokens`` cut can leave it unfinished
(``satisfied`` is then False).

Costs one ``compile`` per tried candidate (tens of microseconds for a short function): opt-in, for code
generation (``StructuredOutput("python", prefix_code)``: ``spec`` is code the output continues, e.g. a function's
signature and docstring; ``lmstack.serve.evaluation.generate(..., python_syntax=True)``).
"""

from __future__ import annotations

import ast
import codeop
import warnings
from typing import Any, Iterable

import torch
from torch import Tensor

_FLAGS = ast.PyCF_ONLY_AST | getattr(codeop, "PyCF_ALLOW_INCOMPLETE_INPUT", 0x4000)


def viable(src: str) -> bool:
    """True when ``src`` can still grow into valid Python (or already is)."""
    try:
        with warnings.catch_warnings():  # e.g. "invalid decimal literal" for 1if: generated text, not ours
            warnings.simplefilter("ignore", SyntaxWarning)
            compile(src, "<generated>", "exec", _FLAGS)
        return True
    except SyntaxError as e:
        if e.msg.startswith("incomplete input"):
            return True
        lines = src.split("\n")
        if e.lineno != len(lines):
            return False
        last = lines[-1]
        if isinstance(e, IndentationError):  # settled once the line has text; blank so far: more may fix it
            return last.strip() == ""
        if e.msg.startswith("unterminated string literal"):
            return True  # a string still being written on the last line
        # the error is where the text ends: more may fix it. Only Python's own whitespace counts as the end's
        # padding (str.rstrip() would also strip \x1c-\x1f, which Python rejects as characters)
        return (e.offset or 0) > len(last.rstrip(" \t\f\r"))
    except (ValueError, OverflowError, MemoryError, RecursionError):
        return False


def complete(src: str) -> bool:
    """True when ``src`` is a whole valid Python module."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            compile(src, "<generated>", "exec", ast.PyCF_ONLY_AST)
        return True
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError):
        return False


def has_code(text: str) -> bool:
    """True when ``text`` has a line that is neither blank nor a comment."""
    return any(ln.strip() and not ln.strip().startswith("#") for ln in text.splitlines())


class PythonSyntax:
    """The :class:`~lmstack.serve.logits.LogitsProcessor` for ``StructuredOutput("python")``."""

    def __init__(self, tokenizer: Any, eos_ids: Iterable[int], prefix: str = "", max_checks: int = 48,
                 mass: float = 0.995, max_fallback: int = 4096):
        self.tok = tokenizer
        self.prefix = prefix  # code the output continues (a function's signature and docstring), checked with it
        self.eos = set(int(e) for e in eos_ids)
        self.max_checks = max_checks
        self.mass = mass
        self.max_fallback = max_fallback  # when none of the likely candidates is viable: try this many in all
        self.ids: list[int] = []
        self.text = ""
        self._piece: dict[int, str] = {}
        self._ends: set[int] = self.eos
        self._stops: list[str] = []

    def _done(self, out: str) -> bool:
        """Whether the output may end as ``out``: prefix + out compiles and, when there is a prefix, ``out`` adds
        code (a prefix that already compiles, e.g. a signature with only a docstring, is not a completion)."""
        return complete(self.prefix + out) and (not self.prefix or has_code(out))

    def _ok(self, t: int, stops: list[str]) -> bool:
        """Whether token ``t`` may come next: an end only on complete code; a token that completes a stop string
        only when the code before the stop string is complete; anything else while the code stays viable."""
        if t in self._ends:
            return self._done(self.text)
        if not stops:
            return viable(self._candidate(t))
        cand = self.tok.decode(self.ids + [t])
        start = max(0, len(self.text) - max(len(s) for s in stops) + 1)  # only where the new text could match
        hits = [i for i in (cand.find(s, start) for s in stops) if i >= 0]
        if hits:
            return self._done(cand[:min(hits)])
        return viable(self.prefix + cand)

    @property
    def satisfied(self) -> bool:
        text = self.text
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return self._done(text[:min(hits)] if hits else text)  # the output the engine keeps

    def _candidate(self, t: int) -> str:
        # decoding the whole output again keeps multi-byte characters and leading-space rules right
        return self.prefix + self.tok.decode(self.ids + [t])

    def __call__(self, logits: Tensor, seq: Any = None) -> Tensor:
        params = getattr(seq, "params", None)
        stops = self._stops = [s for s in (getattr(params, "stop", None) or []) if s]
        self._ends = self.eos | set(getattr(params, "stop_token_ids", None) or [])
        probs = logits.float().softmax(-1)
        order = probs.argsort(descending=True)
        keep: list[int] = []
        covered = 0.0
        for n, t in enumerate(order[: self.max_fallback].tolist()):
            if n >= self.max_checks and keep:
                break  # the likely candidates were tried and some were viable
            if n < self.max_checks or not keep:
                if self._ok(t, stops):
                    keep.append(t)
                    if n >= self.max_checks:
                        break  # past the likely ones: the first viable token is enough
            covered += float(probs[t])
            if covered >= self.mass and keep:
                break
        if not keep:
            return logits
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        allowed[keep] = True
        return logits.masked_fill_(~allowed, float("-inf"))

    def accept(self, token_id: int) -> None:
        if token_id in self._ends:
            return
        self.ids.append(int(token_id))
        self.text = self.tok.decode(self.ids)
