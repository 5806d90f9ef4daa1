"""Document quality signals and filters in the manner of Gopher, C4 and FineWeb, with CJK-aware variants.

References:
  * Gopher: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher",
    appendix A (quality filter: word count 50..100k, mean word length 3..10, symbol/word <= 0.1, bullet
    lines <= 90%, ellipsis lines <= 30%, >= 80% words with a letter, >= 2 stop words; repetition filter:
    duplicate line/paragraph fractions and characters, top n-gram (n=2..4) and duplicate n-gram (n=5..10)
    character fractions).
  * C4: Raffel et al. 2020, section 2.2 ("lorem ipsum", curly braces, lines ending in terminal punctuation).
  * FineWeb: Penedo et al. 2024 (line-ending punctuation ratio >= 0.12, short lines <= 67%, duplicate-line
    characters).

CJK variant: when Han characters dominate, a "word" is one Han character (or one run of Latin letters /
digits), mean word length and the alphabetic-word rule are not applied, the stop-word rule uses Chinese
function characters, and length uses ``min_cjk_chars``.
"""

from __future__ import annotations

import re
from collections import Counter

from lmstack.config import StrictModel
from lmstack.text.lang import _is_han

GOPHER_STOP = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
ZH_STOP = frozenset("的了是在和有我这不人也就都而及与或们个上中")
_SPACED_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*", re.UNICODE)
_CJK_UNIT = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+",
                       re.UNICODE)
_BULLET = ("•", "-", "*", "·", "●", "▪", "‣", "–", "—", "◦", "○", "■", "□", "►", "▶", "➢", "✓")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "」", "』", "…", ")", "）")


class QualityConfig(StrictModel):
    """Thresholds; set any of them to ``null`` to switch that rule off."""

    enabled: bool = True
    # Gopher quality
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_cjk_chars: int | None = 50
    max_cjk_chars: int | None = 200_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines: float | None = 0.9
    max_ellipsis_lines: float | None = 0.3
    min_alpha_words: float | None = 0.8
    min_stop_words: int | None = 2
    # Gopher repetition
    max_dup_line_frac: float | None = 0.3
    max_dup_para_frac: float | None = 0.3
    max_dup_line_char_frac: float | None = 0.2
    max_dup_para_char_frac: float | None = 0.2
    max_top_ngram_char_frac: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    max_dup_ngram_char_frac: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    # C4
    drop_lorem_ipsum: bool = True
    drop_curly_braces: bool = False
    # FineWeb
    min_line_punct_ratio: float | None = 0.12
    max_short_line_ratio: float | None = 0.67
    short_line_chars: int = 30


def is_cjk(text: str, min_share: float = 0.3) -> bool:
    letters = han = 0
    for ch in text[:5000]:
        if ch.isalpha():
            letters += 1
            if _is_han(ord(ch)):
                han += 1
    return letters > 0 and han / letters >= min_share


def words_of(text: str, cjk: bool | None = None) -> list[str]:
    """Words for spaced scripts; for CJK text, single Han characters plus runs of other letters/digits."""
    if cjk is None:
        cjk = is_cjk(text)
    return _CJK_UNIT.findall(text) if cjk else _SPACED_WORD.findall(text)


def _dup_fracs(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_n = dup_chars = total_chars = 0
    for it in items:
        total_chars += len(it)
        if it in seen:
            dup_n += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return dup_n / len(items), (dup_chars / total_chars if total_chars else 0.0)


def top_ngram_char_frac(words: list[str], n: int) -> float:
    """Gopher: characters covered by the most frequent n-gram (counting each occurrence) / all word chars."""
    if len(words) < n:
        return 0.0
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count <= 1:
        return 0.0
    total = sum(len(w) for w in words)
    return sum(len(w) for w in gram) * count / total if total else 0.0


def dup_ngram_char_frac(words: list[str], n: int) -> float:
    """Gopher: characters of words inside any n-gram that occurs more than once / all word chars."""
    if len(words) < n:
        return 0.0
    first: dict[tuple[str, ...], int] = {}
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        j = first.setdefault(g, i)
        if j != i:
            for k in range(i, i + n):
                covered[k] = True
            for k in range(j, j + n):
                covered[k] = True
    total = sum(len(w) for w in words)
    return sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0


def quality_signals(text: str, top_ns=(2, 3, 4), dup_ns=range(5, 11), short_line_chars: int = 30
                    ) -> dict[str, float]:
    """All signals the filters use (also handy for ``lmstack data stats``)."""
    cjk = is_cjk(text)
    words = words_of(text, cjk)
    lines = [ln.strip() for ln in text.split("\n")]
    nonempty = [ln for ln in lines if ln]
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    n_words = len(words)
    sig: dict[str, float] = {"cjk": float(cjk), "n_words": n_words, "n_chars": len(text)}
    sig["mean_word_length"] = (sum(len(w) for w in words) / n_words) if n_words else 0.0
    symbols = text.count("#") + text.count("...") + text.count("…")
    sig["symbol_word_ratio"] = symbols / n_words if n_words else 0.0
    n_lines = max(1, len(nonempty))
    sig["bullet_lines"] = sum(1 for ln in nonempty if ln.startswith(_BULLET)) / n_lines
    sig["ellipsis_lines"] = sum(1 for ln in nonempty if ln.endswith(("...", "…"))) / n_lines
    sig["alpha_words"] = (sum(1 for w in words if any(c.isalpha() for c in w)) / n_words) if n_words else 0.0
    if cjk:
        sig["stop_words"] = sum(1 for ch in text if ch in ZH_STOP)
    else:
        sig["stop_words"] = len({w.lower() for w in words} & GOPHER_STOP)
    sig["dup_line_frac"], sig["dup_line_char_frac"] = _dup_fracs(nonempty)
    sig["dup_para_frac"], sig["dup_para_char_frac"] = _dup_fracs(paras)
    for n in top_ns:
        sig[f"top_{n}gram_char_frac"] = top_ngram_char_frac(words, n)
    for n in dup_ns:
        sig[f"dup_{n}gram_char_frac"] = dup_ngram_char_frac(words, n)
    sig["line_punct_ratio"] = sum(1 for ln in nonempty if ln.endswith(_TERMINAL)) / n_lines
    sig["short_line_ratio"] = sum(1 for ln in nonempty if len(ln) < short_line_chars) / n_lines
    return sig


def quality_check(text: str, cfg: QualityConfig) -> tuple[str | None, dict[str, float]]:
    """Return (name of the first failed rule or None, the signals)."""
    s = quality_signals(text, tuple(cfg.max_top_ngram_char_frac), tuple(cfg.max_dup_ngram_char_frac),
                        cfg.short_line_chars)
    return _first_failure(text, s, cfg), s


def _first_failure(text: str, s: dict[str, float], c: QualityConfig) -> str | None:
    cjk = bool(s["cjk"])
    n = s["n_words"]
    if cjk:
        n_han = sum(1 for ch in text if _is_han(ord(ch)))
        if c.min_cjk_chars is not None and n_han < c.min_cjk_chars:
            return "too_short"
        if c.max_cjk_chars is not None and n_han > c.max_cjk_chars:
            return "too_long"
    else:
        if c.min_words is not None and n < c.min_words:
            return "too_short"
        if c.max_words is not None and n > c.max_words:
            return "too_long"
        if c.min_mean_word_length is not None and s["mean_word_length"] < c.min_mean_word_length:
            return "mean_word_length_low"
        if c.max_mean_word_length is not None and s["mean_word_length"] > c.max_mean_word_length:
            return "mean_word_length_high"
        if c.min_alpha_words is not None and s["alpha_words"] < c.min_alpha_words:
            return "alpha_words_low"
    if c.max_symbol_word_ratio is not None and s["symbol_word_ratio"] > c.max_symbol_word_ratio:
        return "symbol_word_ratio"
    if c.max_bullet_lines is not None and s["bullet_lines"] > c.max_bullet_lines:
        return "bullet_lines"
    if c.max_ellipsis_lines is not None and s["ellipsis_lines"] > c.max_ellipsis_lines:
        return "ellipsis_lines"
    if c.min_stop_words is not None and s["stop_words"] < c.min_stop_words:
        return "stop_words"
    if c.max_dup_line_frac is not None and s["dup_line_frac"] > c.max_dup_line_frac:
        return "dup_lines"
    if c.max_dup_para_frac is not None and s["dup_para_frac"] > c.max_dup_para_frac:
        return "dup_paragraphs"
    if c.max_dup_line_char_frac is not None and s["dup_line_char_frac"] > c.max_dup_line_char_frac:
        return "dup_line_chars"
    if c.max_dup_para_char_frac is not None and s["dup_para_char_frac"] > c.max_dup_para_char_frac:
        return "dup_paragraph_chars"
    for k, thr in sorted(c.max_top_ngram_char_frac.items()):
        if s.get(f"top_{k}gram_char_frac", 0.0) > thr:
            return f"top_{k}gram"
    for k, thr in sorted(c.max_dup_ngram_char_frac.items()):
        if s.get(f"dup_{k}gram_char_frac", 0.0) > thr:
            return f"dup_{k}gram"
    low = text.lower()
    if c.drop_lorem_ipsum and "lorem ipsum" in low:
        return "lorem_ipsum"
    if c.drop_curly_braces and "{" in text:
        return "curly_braces"
    if c.min_line_punct_ratio is not None and s["line_punct_ratio"] < c.min_line_punct_ratio:
        return "line_punct_ratio"
    if c.max_short_line_ratio is not None and s["short_line_ratio"] > c.max_short_line_ratio:
        return "short_lines"
    return None
