"""The code assistant: a model on the serving engine, with the Python-syntax guard (valid Python by
construction, :mod:`lmstack.serve.python_syntax`) and the repair loop (:mod:`lmstack.eval.repair`).

    a = CodeAssistant.load("runs/code/bundle")          # or CodeAssistant.load(model="DIR" | "FILE.gguf")
    a.complete_at("m.py", 12)                            # code that continues m.py's first 12 lines
    a.explain_at("m.py", 12)                             # what the function around line 12 does
    a.solve(prompt, "f", given_tests=["assert f(1) == 2"])  # generate -> check in the sandbox -> repair
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any, Sequence

from lmstack.errors import ConfigError, DataError

MAX_SOURCE_BYTES = 1 << 20  # a file given to complete / explain
STOP = ["\ndef ", "\nclass ", "\nif __name__", "\n@"]


def parse_location(spec: str) -> tuple[Path, int]:
    """``FILE:LINE`` -> (path, 1-based line), one clear error otherwise."""
    path, sep, line = spec.rpartition(":")
    if not sep or not line.isdigit() or int(line) < 1:
        raise ConfigError(f"{spec!r}: expected FILE:LINE with a line number from 1 (e.g. src/m.py:12)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{path}: no such file")
    if p.stat().st_size > MAX_SOURCE_BYTES:
        raise DataError(f"{path}: larger than {MAX_SOURCE_BYTES >> 10} KiB; give a smaller file")
    return p, int(line)


def read_source(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def enclosing(source: str, line: int) -> tuple[int, int] | None:
    """(first, last) 1-based lines of the innermost function or class around ``line``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
             and n.lineno <= line <= (n.end_lineno or n.lineno)]
    if not nodes:
        return None
    n = max(nodes, key=lambda n: n.lineno)
    return n.lineno - len(n.decorator_list), n.end_lineno or n.lineno


class CodeAssistant:
    def __init__(self, llm: Any, *, max_tokens: int = 256, repair_rounds: int = 2, name: str = "model"):
        self.llm = llm
        self.max_tokens = max_tokens
        self.repair_rounds = repair_rounds
        self.name = name

    @classmethod
    def load(cls, bundle: str | Path | None = None, *, model: str | Path | None = None, adapter: str | Path | None = None,
             max_num_seqs: int = 16) -> "CodeAssistant":
        from lmstack.serve.llm import load

        if (bundle is None) == (model is None):
            raise ConfigError("give a code bundle (runs/code/bundle) or --model DIR|FILE.gguf, not both")
        settings: dict[str, Any] = {}
        if bundle is not None:
            from lmstack.apps.bundle import read_bundle

            b = read_bundle(bundle, app="code")
            model, adapter, settings = b.part("model"), b.part("adapter"), b.settings
        llm = load(model, adapter=adapter, max_num_seqs=max_num_seqs)
        return cls(llm, max_tokens=int(settings.get("max_tokens", 256)),
                   repair_rounds=int(settings.get("repair_rounds", 2)), name=str(settings.get("model_name") or
                                                                                Path(str(model)).name))

    # ------------------------------------------------------------------ generation (the evaluation's signature)
    def generate(self, prompts: Sequence[str], *, max_tokens: int = 256, stop: Sequence[str] = (),
                 temperature: float = 0.0, top_p: float = 1.0, n: int = 1, seed: int = 0, progress_cb=None,
                 python_syntax: bool = False) -> list[list[str]]:
        """``n`` completions per prompt on the engine; ``python_syntax``: each stays valid Python as the
        continuation of its own prompt. Prompts are cut on the left to fit the context."""
        from lmstack.serve.types import SamplingParams, StructuredOutput

        tok = self.llm.tokenizer
        room = max(1, self.llm.max_model_len - max_tokens)
        enc = [(tok.encode(p) or [tok.bos_token_id or 0])[-room:] for p in prompts]
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_tokens, stop=[s for s in stop if s], seed=seed)
        plist: Any = params
        if python_syntax:
            plist = [dataclasses.replace(params, structured=StructuredOutput("python", p)) for p in prompts]
        outs = self.llm.generate(enc, plist, use_tqdm=False)
        if progress_cb is not None:
            progress_cb(len(enc) * n)
        return [[c.text for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]

    def complete(self, prefix: str, *, max_tokens: int | None = None, stop: Sequence[str] = STOP,
                 constrained: bool = True) -> str:
        return self.generate([prefix], max_tokens=max_tokens or self.max_tokens, stop=stop,
                             python_syntax=constrained)[0][0]

    def complete_at(self, path: str | Path, line: int, **kw: Any) -> str:
        """Code that continues ``path``'s first ``line`` lines (valid Python together with them)."""
        lines = read_source(Path(path))
        prefix = "".join(lines[:line])
        if prefix and not prefix.endswith("\n"):
            prefix += "\n"
        return self.complete(prefix, **kw)

    def explain_at(self, path: str | Path, line: int, max_tokens: int = 160) -> str:
        """A short explanation of the function (or class) around ``line``, else of the lines near it."""
        lines = read_source(Path(path))
        if line > len(lines):
            raise ConfigError(f"{path}:{line}: the file has {len(lines)} lines")
        span = enclosing("".join(lines), line) or (max(1, line - 10), min(len(lines), line + 10))
        snippet = "".join(lines[span[0] - 1:span[1]])[:6000]
        msgs = [{"role": "user", "content": f"Explain briefly what this Python code from {Path(path).name} "
                                            f"(lines {span[0]}-{span[1]}) does:\n\n```python\n{snippet}```"}]
        return self.llm.chat(msgs, max_tokens=max_tokens, temperature=0.0).outputs[0].text.strip()

    def solve(self, prompt: str, entry_point: str, given_tests: Sequence[str] = (), rounds: int | None = None,
              own_tests: bool = True) -> tuple[str, dict[str, Any]]:
        """Generate a function body for ``prompt`` (signature + docstring) under the syntax guard, then repair it
        against the docstring's examples, ``given_tests`` and the model's own tests in the sandbox."""
        from lmstack.eval.repair import repair

        first = self.generate([prompt], max_tokens=self.max_tokens, stop=STOP, python_syntax=True)
        best, log = repair(self.generate, [prompt], [entry_point], first,
                           rounds=self.repair_rounds if rounds is None else rounds, given=[list(given_tests)],
                           own_tests=own_tests, max_tokens=self.max_tokens, stop=STOP, python_syntax=True)
        return best[0][0], log[0]

    def fix(self, repo: str | Path, test_cmd: str, *, rounds: int | None = None, branch: str | None = None,
            timeout: float = 60.0):
        from lmstack.apps.code.repo import fix

        return fix(repo, test_cmd, lambda prompt: self.complete(prompt, stop=STOP), rounds=rounds or
                   max(1, self.repair_rounds + 1), branch=branch, timeout=timeout, model_name=self.name)
