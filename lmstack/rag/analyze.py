"""Text -> index terms for BM25, the same for documents and queries (English and Chinese).

- Text is NFKC-normalised and lower-cased.
- Latin words and numbers: function words dropped, then a light suffix stemmer (``shipping``/``ships`` ->
  ``ship``, ``colors`` -> ``color``, ``returned`` -> ``return``) so inflections meet. Numbers are kept
  (``3-5`` -> ``3``, ``5``; ``$4.99`` -> ``4``, ``99``).
- Han characters have no spaces between words, so each run is cut into overlapping character bigrams
  (``退货运费`` -> ``退货 货运 运费``), the CJK analyzer of Lucene/Elasticsearch; a single Han character
  stands as a unigram. Bigrams match Chinese words without a segmenter and keep scoring per word-ish unit.

SQLite's FTS5 then indexes the space-joined terms with its plain ``unicode61`` tokenizer (which keeps each
term whole), so the BM25 scores it computes are exactly Okapi BM25 over these terms (tests check this
against a hand computation).
"""

from __future__ import annotations

import re
import unicodedata

_TOKEN = re.compile(r"[a-z]+|[0-9]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

# function words only: content words such as "long", "free", "day" carry meaning for support questions
STOP = frozenset(
    "a an the and or but if of to in on at by for from with as into about is are was were be been being am "
    "do does did doing have has had having i me my we our you your he she it its they them their this that "
    "these those there here what which who whom whose when where why how can could would should will shall "
    "may might must s t d ll re ve m please any some".split())


def stem(word: str) -> str:
    """A light English suffix stemmer (a subset of Porter step 1): plurals, -ing, -ed."""
    w = word
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith(("sses", "xes", "ches", "shes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    for suf in ("ing", "ed"):
        if len(w) > len(suf) + 2 and w.endswith(suf):
            w = w[: -len(suf)]
            if len(w) > 2 and w[-1] == w[-2] and w[-1] not in "lsz":  # shipp -> ship
                w = w[:-1]
            break
    return w


def terms(text: str, han: str = "bigram") -> list[str]:
    """Index terms of ``text`` in order (repeats kept: they are the term frequencies). ``han``: "bigram"
    (overlapping character bigrams) or "jieba" (jieba's words, searched mode: long words also give their parts)."""
    text = unicodedata.normalize("NFKC", text).lower()
    out: list[str] = []
    for m in _TOKEN.finditer(text):
        t = m.group()
        if _HAN.match(t):
            if han == "jieba":
                out.extend(w for w in _jieba().lcut_for_search(t) if w.strip())
            elif len(t) == 1:
                out.append(t)
            else:
                out.extend(t[i:i + 2] for i in range(len(t) - 1))
        elif t.isdigit():
            out.append(t)
        elif t not in STOP:
            out.append(stem(t))
    return out


HAN_MODES = ("bigram", "jieba")


def _jieba():
    try:
        import jieba
    except ImportError:
        from lmstack.errors import ConfigError

        raise ConfigError("Chinese word segmentation needs jieba: pip install 'lmstack[rag]' (or use bigrams)") from None
    import logging

    jieba.setLogLevel(logging.WARNING)
    return jieba


def has_han(text: str) -> bool:
    return _HAN.search(text) is not None


def query_lang(text: str) -> str:
    """``zh`` when the text has any Han character, else ``en`` (all the support assistant needs)."""
    return "zh" if has_han(text) else "en"
