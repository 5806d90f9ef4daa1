"""Precision / recall per PII kind on a labelled set (``lmstack guard eval --rail pii``), for lmstack.text.pii
and, on the English rows, Microsoft Presidio's analyzer (``presidio-analyzer``) as the named baseline.

The set is JSON Lines ``{"text", "lang", "spans": [[KIND, "substring"], ...]}``: every PII item in the text with
its kind (a substring; repeated substrings are matched left to right), and rows with ``"spans": []`` that are
look-alikes which must not match (order and tracking numbers, dates, versions, prices, Luhn-failing cards ...).
The shipped set is ``data/pii.jsonl`` (English and Chinese, written for lmstack): split ``dev`` is the part whose
misses were fixed in the detectors (so lmstack scores high there by construction), ``heldout`` was written after
those fixes and never used to tune them -- read its numbers as the honest ones.

Scoring: a predicted span is a true positive when it has the gold span's kind and overlaps it (each gold span is
matched at most once); any other prediction of a scored kind is a false positive; an unmatched gold span is a
false negative. Overlap, not exact boundaries, because detectors disagree on whether "+1" or "ext. 12" belongs to
a phone number. Only the kinds the detector claims are scored for it (Presidio has no Chinese resident ID).

Presidio runs its English pattern recognizers (credit card, email, IBAN, IP, phone via ``phonenumbers``); its
spaCy NER model is not installable offline from PyPI, so it runs through a blank spaCy pipeline (tokens only)
-- which only turns off the NER entities (names, places, dates) that lmstack does not detect either.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from lmstack.text.pii import KINDS, find_pii

DATA = Path(__file__).with_name("data") / "pii.jsonl"
MAX_ROWS = 100_000
MAX_ROW_CHARS = 100_000
# Presidio entity -> lmstack kind
PRESIDIO_KINDS = {"CREDIT_CARD": "CREDIT_CARD", "EMAIL_ADDRESS": "EMAIL", "IBAN_CODE": "IBAN", "IP_ADDRESS": "IP",
                  "PHONE_NUMBER": "PHONE"}

Span = tuple[str, int, int]  # kind, start, end
Detector = Callable[[str], list[Span]]


def read_pii_set(path: str | Path = DATA) -> list[dict[str, Any]]:
    """Rows with ``gold``: [(kind, start, end)] located in the text. One line per error (DataError naming the
    file and line): not JSON, no text, an unknown kind, a span that is not in the text."""
    from lmstack.errors import DataError

    rows = []
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: labelled PII set not found")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if n > MAX_ROWS:
                raise DataError(f"{p}: more than {MAX_ROWS} rows")
            try:
                r = json.loads(line)
                text, spans = r["text"], r.get("spans", [])
                if not isinstance(text, str) or len(text) > MAX_ROW_CHARS or not isinstance(spans, list):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{p}:{n}: expected {{\"text\": str, \"spans\": [[KIND, substring], ...]}}") from None
            gold, pos = [], {}
            for s in spans:
                if not (isinstance(s, list) and len(s) == 2 and s[0] in KINDS and isinstance(s[1], str) and s[1]):
                    raise DataError(f"{p}:{n}: span {str(s)[:60]} is not [KIND, substring] with KIND in {KINDS}")
                start = text.find(s[1], pos.get(s[1], 0))
                if start < 0:
                    raise DataError(f"{p}:{n}: span {s[1][:40]!r} is not in the text")
                pos[s[1]] = start + 1
                gold.append((s[0], start, start + len(s[1])))
            rows.append({"text": text, "lang": r.get("lang") or "", "split": r.get("split") or "", "gold": gold})
    return rows


def lmstack_detector(text: str) -> list[Span]:
    return [(s.kind, s.start, s.end) for s in find_pii(text)]


def presidio_available() -> bool:
    try:
        import presidio_analyzer  # noqa: F401
        import spacy  # noqa: F401
    except ImportError:
        return False
    return True


def presidio_detector() -> Detector:
    """Presidio's AnalyzerEngine (English pattern recognizers, blank spaCy pipeline: module docstring). Every
    result of a mapped entity counts, whatever its score (Presidio's default ``score_threshold`` is 0)."""
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    logging.getLogger("tldextract").setLevel(logging.CRITICAL)  # it tries to refresh its suffix list online

    class _Blank(SpacyNlpEngine):
        def load(self) -> None:
            self.nlp = {"en": spacy.blank("en")}

    nlp = _Blank(models=[{"lang_code": "en", "model_name": "blank:en"}])
    nlp.load()
    engine = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])
    entities = list(PRESIDIO_KINDS)

    def detect(text: str) -> list[Span]:
        return [(PRESIDIO_KINDS[r.entity_type], r.start, r.end)
                for r in engine.analyze(text, language="en", entities=entities)]

    return detect


def _prf(tp: int, fp: int, fn: int) -> dict[str, Any]:
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4), "tp": tp, "fp": fp, "fn": fn}


def score(rows: Iterable[dict[str, Any]], detect: Detector, kinds: Iterable[str] = KINDS) -> dict[str, Any]:
    """Per kind and overall (micro) precision / recall / F1, plus the look-alike rows that got any prediction."""
    kinds = list(kinds)
    c = {k: [0, 0, 0] for k in kinds}
    lookalike_rows = lookalike_hits = 0
    misses: list[str] = []
    false: list[str] = []
    for r in rows:
        pred = [p for p in detect(r["text"]) if p[0] in c]
        gold = [g for g in r["gold"] if g[0] in c]
        used = [False] * len(gold)
        for k, s, e in pred:
            j = next((i for i, (gk, gs, ge) in enumerate(gold) if not used[i] and gk == k and s < ge and gs < e), -1)
            if j >= 0:
                used[j] = True
                c[k][0] += 1
            else:
                c[k][1] += 1
                false.append(f"{k}: {r['text'][s:e]!r}")
        for (k, s, e), u in zip(gold, used):
            if not u:
                c[k][2] += 1
                misses.append(f"{k}: {r['text'][s:e]!r}")
        if not r["gold"]:
            lookalike_rows += 1
            lookalike_hits += bool(pred)
    tot = [sum(v[i] for v in c.values()) for i in range(3)]
    return {"all": _prf(*tot), **{k: _prf(*v) for k, v in c.items() if sum(v)},
            "lookalike_rows": lookalike_rows, "lookalike_rows_matched": lookalike_hits,
            "misses": misses[:50], "false_positives": false[:50]}


def evaluate_pii(path: str | Path = DATA, *, presidio: bool | None = None) -> dict[str, Any]:
    """lmstack on every row, per language; with ``presidio`` (None: when installed) both detectors on the
    English rows over the kinds both claim (CN_ID is lmstack-only)."""
    rows = read_pii_set(path)
    out: dict[str, Any] = {"set": str(path), "rows": len(rows), "spans": sum(len(r["gold"]) for r in rows),
                           "matching": "same kind, overlapping span", "lmstack": {"all": score(rows, lmstack_detector)}}
    for lang in sorted({r["lang"] for r in rows if r["lang"]}):
        out["lmstack"][lang] = score([r for r in rows if r["lang"] == lang], lmstack_detector)
    for sp in sorted({r["split"] for r in rows if r["split"]}):
        out["lmstack"][f"split={sp}"] = score([r for r in rows if r["split"] == sp], lmstack_detector)
    if presidio is None:
        presidio = presidio_available()
    if presidio:
        en = [r for r in rows if r["lang"] == "en"]
        shared = sorted(set(PRESIDIO_KINDS.values()))
        out["en_shared_kinds"] = {"kinds": shared,
                                  "lmstack": score(en, lmstack_detector, shared),
                                  "presidio": score(en, presidio_detector(), shared),
                                  "presidio_setup": "presidio-analyzer pattern recognizers, blank spaCy 'en' "
                                                    "pipeline (no NER model offline)"}
    return out
