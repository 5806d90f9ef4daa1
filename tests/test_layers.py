"""The house stays right: shared/DESIGN.md's import order, checked on every module's imports.

    config, utils, text  <-  tokenizer, data, model  <-  train, tune, quant, export, eval  <-  serve
                         <-  rag, guard, rl  <-  apps, pipeline, cli

A module may import its own floor and the floors below it, never above -- function-level imports and
``importlib.import_module("lmstack....")`` included. Two more rules from the design: ``model`` never imports
``tune`` or ``quant`` (adapters and quantized linears are module swaps applied from outside), and ``pipeline``
imports no app. The root package (``lmstack/__init__.py``: ``lmstack.load`` reaches the serving engine) counts
as the top floor, so ``from lmstack import __version__`` below it is an upward import (``lmstack._version``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lmstack"

FLOORS = [
    {"config", "utils", "text", "errors", "_version"},
    {"tokenizer", "data", "model"},
    {"train", "tune", "quant", "export", "eval", "kernels", "mm"},
    {"serve"},
    {"rag", "guard", "rl"},  # rl: PPO/GRPO roll out through the serving engine
    {"apps", "pipeline", "cli", ""},  # "": the root package lmstack/__init__.py
]
FLOOR = {area: i for i, areas in enumerate(FLOORS) for area in areas}
FORBIDDEN = {("model", "tune"), ("model", "quant"), ("pipeline", "apps")}


def area_of(module: str) -> str:
    """``lmstack.serve.api.chat`` -> ``serve``; ``lmstack`` -> ``""`` (the root package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every lmstack module ``path`` imports, anywhere in the file: (line, module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "lmstack":  # from lmstack import serve -> lmstack.serve; from lmstack import load -> root
                out += [(node.lineno, f"lmstack.{a.name}" if (PKG / a.name).exists() or (PKG / f"{a.name}.py").exists()
                         else "lmstack") for a in node.names]
            else:
                out.append((node.lineno, mod))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return [(line, m) for line, m in out if m == "lmstack" or m.startswith("lmstack.")]


def violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = area_of(module_name(path))
        if me not in FLOOR:
            bad.append(f"{path.relative_to(PKG.parent)}: area {me!r} has no floor in DESIGN.md's import order")
            continue
        for line, mod in imports(path):
            them = area_of(mod)
            if them == me:
                continue
            if them not in FLOOR:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod} (area {them!r} has no floor)")
            elif FLOOR[them] > FLOOR[me] or (me, them) in FORBIDDEN:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod}: {me} may not import {them or 'lmstack'}")
    return bad


def test_no_upward_import_anywhere_in_the_package():
    assert violations() == []


def test_the_checker_sees_function_level_relative_and_dynamic_imports(tmp_path):
    """The checker itself: an upward import hidden in a function, a relative one and an import_module string
    are all caught (the test above could otherwise pass while checking nothing)."""
    global PKG
    fake = tmp_path / "lmstack"
    for area in ("data", "serve", "pipeline", "apps", "model"):
        (fake / area).mkdir(parents=True)
        (fake / area / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "data" / "a.py").write_text("def f():\n    from lmstack.serve import x\n")
    (fake / "data" / "b.py").write_text("from ..serve import y\nfrom . import a\n")
    (fake / "pipeline" / "c.py").write_text("import importlib\nimportlib.import_module('lmstack.apps.support')\n")
    (fake / "model" / "d.py").write_text("from lmstack import __version__\nfrom lmstack.data import a\n")
    (fake / "apps" / "e.py").write_text("from lmstack.pipeline import c\nfrom lmstack.serve import y\n")
    PKG, saved = fake, PKG
    try:
        found = violations()
    finally:
        PKG = saved
    assert found == [
        "lmstack/data/a.py:2 imports lmstack.serve: data may not import serve",
        "lmstack/data/b.py:1 imports lmstack.serve: data may not import serve",
        "lmstack/model/d.py:1 imports lmstack: model may not import lmstack",
        "lmstack/pipeline/c.py:2 imports lmstack.apps.support: pipeline may not import apps",
    ]


@pytest.mark.parametrize("module,area", [("lmstack.serve.api.chat", "serve"), ("lmstack", ""),
                                         ("lmstack._version", "_version")])
def test_area_of(module, area):
    assert area_of(module) == area
