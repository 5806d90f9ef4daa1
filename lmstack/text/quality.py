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

from lmstack.config import StrictModel
import numpy as np

from lmstack.text.lang import HAN_RE, count_matches

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


_LETTER = re.compile(r"[^\W\d_]")


def is_cjk(text: str, min_share: float = 0.3) -> bool:
    """Han characters are at least ``min_share`` of the letters (in the first 4000 characters)."""
    sample = text[:4000]
    if sample.isascii():
        return False
    letters = count_matches(_LETTER, sample)
    return letters > 0 and count_matches(HAN_RE, sample) / letters >= min_share


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


_PRIME = np.uint64(1099511628211)  # FNV-64 prime as the polynomial base of the rolling n-gram hash


class _Words:
    """Word ids and lengths as arrays, with rolling n-gram hashes: (L,) -> (L - n + 1,) per n."""

    def __init__(self, words: list[str]) -> None:
        # Python's string hash: equal words -> equal ids within this process, which is all a document needs
        self.ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
        self.lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.total = int(self.lens.sum())
        self._h: dict[int, np.ndarray] = {1: self.ids}

    def hashes(self, n: int) -> np.ndarray:
        if n not in self._h:
            prev = self.hashes(n - 1)
            with np.errstate(over="ignore"):
                self._h[n] = prev[:-1] * _PRIME + self.ids[n - 1:]
        return self._h[n]


def _top_ngram(w: _Words, n: int) -> float:
    L = len(w.ids)
    if L < n or w.total == 0:
        return 0.0
    uniq, first, counts = np.unique(w.hashes(n), return_index=True, return_counts=True)
    top = counts.max()
    if top <= 1:
        return 0.0
    p = int(first[counts == top].min())  # ties: the n-gram seen first (as collections.Counter.most_common)
    return float(w.lens[p:p + n].sum() * top / w.total)


def _dup_ngram(w: _Words, n: int) -> float:
    L = len(w.ids)
    if L < n or w.total == 0:
        return 0.0
    _, inv, counts = np.unique(w.hashes(n), return_inverse=True, return_counts=True)
    starts = np.flatnonzero(counts[inv] > 1)  # every occurrence of a repeated n-gram
    if len(starts) == 0:
        return 0.0
    diff = np.zeros(L + 1, dtype=np.int64)
    np.add.at(diff, starts, 1)
    np.add.at(diff, starts + n, -1)
    covered = np.cumsum(diff[:L]) > 0
    return float(w.lens[covered].sum() / w.total)


def top_ngram_char_frac(words: list[str], n: int) -> float:
    """Gopher: characters covered by the most frequent n-gram (counting each occurrence) / all word chars."""
    return _top_ngram(_Words(words), n)


def dup_ngram_char_frac(words: list[str], n: int) -> float:
    """Gopher: characters of words inside any n-gram that occurs more than once / all word chars."""
    return _dup_ngram(_Words(words), n)


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
    w = _Words(words)
    sig["mean_word_length"] = (w.total / n_words) if n_words else 0.0
    symbols = text.count("#") + text.count("...") + text.count("…")
    sig["symbol_word_ratio"] = symbols / n_words if n_words else 0.0
    n_lines = max(1, len(nonempty))
    sig["bullet_lines"] = sum(1 for ln in nonempty if ln.startswith(_BULLET)) / n_lines
    sig["ellipsis_lines"] = sum(1 for ln in nonempty if ln.endswith(("...", "…"))) / n_lines
    # words with a letter = all but the all-digit ones (the tokenizer splits on punctuation)
    sig["alpha_words"] = (1.0 - sum(map(str.isdigit, words)) / n_words) if n_words else 0.0
    if cjk:
        sig["stop_words"] = sum(1 for ch in text if ch in ZH_STOP)
    else:
        sig["stop_words"] = len({w.lower() for w in words} & GOPHER_STOP)
    sig["dup_line_frac"], sig["dup_line_char_frac"] = _dup_fracs(nonempty)
    sig["dup_para_frac"], sig["dup_para_char_frac"] = _dup_fracs(paras)
    for n in top_ns:
        sig[f"top_{n}gram_char_frac"] = _top_ngram(w, n)
    none_dup = False  # no repeated n-gram implies no repeated longer n-gram
    for n in sorted(dup_ns):
        v = 0.0 if none_dup else _dup_ngram(w, n)
        none_dup = v == 0.0
        sig[f"dup_{n}gram_char_frac"] = v
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
        n_han = count_matches(HAN_RE, text)
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
