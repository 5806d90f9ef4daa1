"""Every relative link in README.md and docs/*.md resolves: the file exists, and a ``#fragment`` names a heading
of the target (GitHub's anchor rule: lower-case, punctuation dropped, spaces to hyphens)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "README.zh-CN.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


def _strip_fences(text: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)


def _strip_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", _strip_fences(text))


def anchors(md: Path) -> set[str]:
    """GitHub heading anchors of ``md`` (duplicates get -1, -2, ...)."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    for line in _strip_fences(md.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # link text only
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(md: Path) -> list[str]:
    text = _strip_code(md.read_text(encoding="utf-8"))
    targets = [m.group(1) for m in LINK.finditer(text)] + REF.findall(text)
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z+.-]*:", t)]  # http:, mailto:, ...


def broken(md: Path) -> list[str]:
    bad = []
    for t in relative_links(md):
        path, _, frag = t.partition("#")
        target = (md.parent / path).resolve() if path else md
        if not target.exists():
            bad.append(f"{md.relative_to(ROOT)}: {t} (no such file)")
        elif frag and target.suffix == ".md" and frag.lower() not in anchors(target):
            bad.append(f"{md.relative_to(ROOT)}: {t} (no heading #{frag} in {target.name})")
    return bad


def test_every_relative_link_in_readme_and_docs_resolves():
    assert len(DOCS) > 5
    problems = [b for md in DOCS for b in broken(md)]
    assert not problems, "\n".join(problems)


def test_the_checker_sees_broken_links(tmp_path):
    (tmp_path / "a.md").write_text("# Title one\n## Second: part\n### Why a 3.9M `tiny`\n", encoding="utf-8")
    md = tmp_path / "b.md"
    md.write_text("[ok](a.md) [ok2](a.md#second-part) [ok3](a.md#why-a-39m-tiny) [self](#top) [gone](missing.md) [frag](a.md#nope)\n"
                  "```\n[in code](ignored.md)\n```\n[web](https://example.com) ![img](pic.png)\n\n# Top\n",
                  encoding="utf-8")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert broken(md) == ["b.md: missing.md (no such file)", "b.md: a.md#nope (no heading #nope in a.md)",
                              "b.md: pic.png (no such file)"]
    finally:
        ROOT = old


COMMAND = re.compile(r"(?:^|`|\$ |\n)\s*((?:make|lmstack) [a-z][\w.-]*(?: [a-z][\w.-]*)?)")


def commands(md: Path) -> set[str]:
    """The ``make X`` / ``lmstack X [Y]`` commands a page tells its reader to run (code spans and blocks)."""
    text = md.read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M) + re.findall(r"`([^`\n]+)`", text))
    out = set()
    for line in code.splitlines():
        for m in COMMAND.finditer(line):
            words = m.group(1).split()
            # "lmstack support chat", "lmstack run", "make demo": the command, not its arguments
            out.add(" ".join(words[:3] if words[0] == "lmstack" and len(words) > 2 and words[1] in SUBGROUPS
                             else words[:2]))
    return out


SUBGROUPS = {"support", "guard", "eval", "tokenizer", "data", "classify", "align"}


def test_chinese_docs_name_the_same_commands_as_the_english_ones():
    """README.zh-CN.md and docs/quickstart.zh-CN.md are kept in step with their English pages: the same commands."""
    pairs = [(ROOT / "README.md", ROOT / "README.zh-CN.md"),
             (ROOT / "docs" / "quickstart.md", ROOT / "docs" / "quickstart.zh-CN.md")]
    for en, zh in pairs:
        assert zh.is_file(), f"{zh.name} is missing"
        text = zh.read_text(encoding="utf-8")
        assert len(re.findall(r"[\u4e00-\u9fff]", text)) >= 500, f"{zh.name} is not in Chinese"
        a, b = commands(en), commands(zh)
        assert len(a) >= 3 and a == b, f"{en.name} vs {zh.name}: only English {sorted(a - b)}, only Chinese {sorted(b - a)}"
