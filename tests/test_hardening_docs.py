"""Every relative link in README.md and docs/*.md resolves: the file exists, and a ``#fragment`` names a heading
of the target (GitHub's anchor rule: lower-case, punctuation dropped, spaces to hyphens)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
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
