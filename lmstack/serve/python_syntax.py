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
when the whole code compiles. Checking before a token is taken is the backtracking: a candidate that would break
the code is never sampled, so nothing has to be undone. When no tried candidate is viable the row is left as
it is (the guard cannot help there) and ``satisfied`` reports whether the final text parses.

Costs one ``compile`` per tried candidate (tens of microseconds for a short function): opt-in, for code
generation (``StructuredOutput("python", prefix_code)``: ``spec`` is code the output continues, e.g. a function's
signature and docstring; ``lmstack.serve.evaluation.generate(..., python_syntax=True)``).
"""

from __future__ import annotations

import ast
import codeop
from typing import Any, Iterable

import torch
from torch import Tensor

_FLAGS = ast.PyCF_ONLY_AST | getattr(codeop, "PyCF_ALLOW_INCOMPLETE_INPUT", 0x4000)


def viable(src: str) -> bool:
    """True when ``src`` can still grow into valid Python (or already is)."""
    try:
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
        return (e.offset or 0) > len(last.rstrip())  # the error is where the text ends: more may fix it
    except (ValueError, OverflowError, MemoryError, RecursionError):
        return False


def complete(src: str) -> bool:
    """True when ``src`` is a whole valid Python module."""
    try:
        compile(src, "<generated>", "exec", ast.PyCF_ONLY_AST)
        return True
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError):
        return False


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

    @property
    def satisfied(self) -> bool:
        return complete(self.prefix + self.text)

    def _candidate(self, t: int) -> str:
        # decoding the whole output again keeps multi-byte characters and leading-space rules right
        return self.prefix + self.tok.decode(self.ids + [t])

    def __call__(self, logits: Tensor, seq: Any = None) -> Tensor:
        probs = logits.float().softmax(-1)
        order = probs.argsort(descending=True)
        keep: list[int] = []
        covered = 0.0
        for n, t in enumerate(order[: self.max_fallback].tolist()):
            if n >= self.max_checks and keep:
                break  # the likely candidates were tried and some were viable
            if n < self.max_checks or not keep:
                ok = complete(self.prefix + self.text) if t in self.eos else viable(self._candidate(t))
                if ok:
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
        if token_id in self.eos:
            return
        self.ids.append(int(token_id))
        self.text = self.tok.decode(self.ids)
