"""A general-text corpus that every Python installation already has: the standard library.

Three kinds of document, all under the Python Software Foundation License (PSF-2.0), available offline:

- ``topic``     the ``pydoc_data.topics`` help pages (the language reference as prose, ~460 KB);
- ``docstring`` each stdlib module's docstrings (module, classes, functions) joined into one prose document;
- ``code``      the module source files themselves.

Deterministic: files are visited in sorted order and the corpus is cut at ``max_chars`` with a fixed share
per kind (prose first: topics, then docstrings, then code fills what is left). Test suites, ``idlelib``,
``site-packages``, generated tables and files larger than ``max_file_chars`` are skipped.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from pathlib import Path
from typing import Any, Iterator

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo",
             "ensurepip", "config-3", "tkinter", "pydoc_data", "encodings"}
LICENSE = "PSF-2.0"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_files(root: Path | None = None, max_file_chars: int = 200_000) -> Iterator[Path]:
    root = root or stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") or part.startswith("test") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_") or rel.name.startswith("_pydecimal"):
            continue
        try:
            if path.stat().st_size > max_file_chars:
                continue
        except OSError:
            continue
        yield path


def topic_documents() -> Iterator[dict[str, Any]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield {"text": text, "source": f"pydoc_data.topics:{name}", "kind": "topic", "license": LICENSE}


def _docstrings(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                out.append(doc)
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def docstring_documents(root: Path | None = None) -> Iterator[dict[str, Any]]:
    """One prose document per stdlib module: its module, class and function docstrings (lazy: parses on demand)."""
    root = root or stdlib_dir()
    for path in iter_stdlib_files(root):
        src = _read(path)
        if src is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                tree = ast.parse(src)
            except (SyntaxError, ValueError):
                continue
        docs = _docstrings(tree)
        if docs:
            yield {"text": "\n\n".join(docs), "source": f"stdlib:{path.relative_to(root)}#docstrings",
                   "kind": "docstring", "license": LICENSE}


def code_documents(root: Path | None = None) -> Iterator[dict[str, Any]]:
    root = root or stdlib_dir()
    for path in iter_stdlib_files(root):
        src = _read(path)
        if src and src.strip():
            yield {"text": src, "source": f"stdlib:{path.relative_to(root)}", "kind": "code", "license": LICENSE}


def stdlib_corpus(max_chars: int = 4_000_000, share: dict[str, float] | None = None,
                  root: Path | None = None) -> list[dict[str, Any]]:
    """Documents up to ``max_chars`` in total: ``share`` of the budget per kind (default: 15% topics,
    35% docstrings, the rest code); budget a kind leaves unused passes to the next one."""
    share = share or {"topic": 0.15, "docstring": 0.35, "code": 0.50}
    out: list[dict[str, Any]] = []
    used = 0

    def take(docs: Iterator[dict[str, Any]], budget: int) -> None:
        nonlocal used
        spent = 0
        for d in docs:
            if budget - spent < 200:
                break  # full: stop reading (and parsing) files
            n = len(d["text"])
            if spent + n > budget:
                continue  # too big for what is left; a smaller document may still fit
            out.append(d)
            spent += n
            used += n

    take(topic_documents(), int(max_chars * share.get("topic", 0)))
    take(docstring_documents(root), int(max_chars * (share.get("topic", 0) + share.get("docstring", 0))) - used)
    take(code_documents(root), max_chars - used)
    return out
