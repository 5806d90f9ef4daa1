"""Text augmentation for small labelled sets: EDA with protected spans, English and Chinese.

EDA (Wei & Zou 2019, "EDA: Easy Data Augmentation Techniques for Boosting Performance on Text Classification"):
synonym replacement (SR), random insertion of a synonym (RI), random swap (RS) and random deletion (RD), each
changing about ``alpha * words`` words. Chinese is segmented into words with ``jieba``; English with a regex.
Synonyms come from the shipped lists (``lmstack/data/synonyms/{en,zh}.txt``, written for lmstack, CC0) or a
user file of the same format.

Protected tokens are never replaced, moved, deleted or used as an insertion source: anything with a digit
(order numbers, amounts, dates), PII placeholders (``<EMAIL>``, ``<PHONE_2>``, ...), words with a capital letter
after the first token (names, places: "Hong Kong"), all-caps words, and a caller's ``protect`` list.

Every candidate then passes two filters, whose rejections are counted: exact dedup (the dedup key of
:func:`lmstack.text.normalize.dedup_key_text` against the originals and the earlier candidates) and a quality
gate (the language must stay the one detected for the original, at least half of its words must remain, and
every protected token must still be there).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from lmstack.errors import ConfigError, DataError

SYNONYM_DIR = Path(__file__).with_name("synonyms")
OPS = ("synonym", "insert", "swap", "delete")
_PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]*(?:_\d+)?>")
_EN_TOKEN = re.compile(r"<[A-Z][A-Z_]*(?:_\d+)?>|[$€£¥]?\d+(?:[.,:/-]\d+)+|\w+(?:['’-]\w+)*|[^\w\s]", re.UNICODE)
_HAN = re.compile(r"[\u3400-\u9fff]")
_PUNCT = re.compile(r"^[^\w<>]+$", re.UNICODE)
MAX_TEXT_CHARS = 10_000


@dataclass
class AugmentConfig:
    n_aug: int = 4  # candidates per record (before the filters)
    ops: tuple[str, ...] = OPS
    alpha: float = 0.1  # share of words each operation changes (at least one)
    seed: int = 0
    synonyms_en: str | None = None  # a synonym file; default: the shipped list
    synonyms_zh: str | None = None
    protect: tuple[str, ...] = ()  # extra words never touched
    dedup: bool = True
    quality: bool = True

    def __post_init__(self) -> None:
        self.ops = tuple(self.ops)
        bad = sorted(set(self.ops) - set(OPS))
        if bad or not self.ops:
            raise ConfigError(f"augment ops {list(self.ops)}: choose from {', '.join(OPS)}")
        if not 0 < self.alpha <= 0.5:
            raise ConfigError(f"augment alpha must be in (0, 0.5], got {self.alpha}")
        if not 1 <= self.n_aug <= 64:
            raise ConfigError(f"augment n_aug must be in 1..64, got {self.n_aug}")


def read_synonyms(path: str | Path) -> dict[tuple[str, ...], list[tuple[str, ...]]]:
    """``a | b | c`` lines -> {phrase: [other phrases]}, phrases as lower-case token tuples."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: synonym file not found")
    if p.stat().st_size > 32 << 20:
        raise DataError(f"{p}: synonym file over 32 MiB")
    table: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        group = [tuple(w.lower().split()) for w in line.split("|") if w.strip()]
        if len(group) < 2:
            raise DataError(f"{p}:{lineno}: a synonym group needs at least two entries separated by ' | '")
        for g in group:
            table.setdefault(g, [])
            table[g] += [o for o in group if o != g and o not in table[g]]
    return table


def _jieba():
    try:
        import jieba
    except ImportError:
        raise ConfigError("Chinese augmentation needs jieba: pip install 'lmstack[data]' (or pip install jieba)"
                          ) from None
    jieba.setLogLevel(60)
    return jieba


def tokenize(text: str, lang: str) -> list[str]:
    """Words and punctuation (no whitespace). Chinese: jieba's words, with placeholders kept whole."""
    if lang != "zh":
        return _EN_TOKEN.findall(text)
    jb = _jieba()
    out: list[str] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        out += [t for t in jb.lcut(text[pos:m.start()]) if t.strip()]
        out.append(m.group())
        pos = m.end()
    out += [t for t in jb.lcut(text[pos:]) if t.strip()]
    return out


def detokenize(tokens: Sequence[str], lang: str) -> str:
    out = ""
    for t in tokens:
        if not out:
            out = t
        elif lang == "zh":
            out += (" " + t) if (out[-1].isascii() and out[-1].isalnum() and t[0].isascii() and t[0].isalnum()) else t
        elif _PUNCT.match(t) and t not in "(\"'“‘":
            out += t
        else:
            out += " " + t
    return out


def text_lang(text: str) -> str:
    return "zh" if len(_HAN.findall(text)) >= max(1, 0.3 * len(re.findall(r"\w", text))) else "en"


def protected(tokens: Sequence[str], extra: Iterable[str] = (), known: frozenset[str] = frozenset()) -> list[bool]:
    """Per token: never touch it. A capitalised first word counts as a name unless it is an English function word
    or in ``known`` (the synonym vocabulary): "Maria paid" keeps Maria, "Please cancel" may lose Please."""
    from lmstack.text.lang import EN_STOP

    extra_l = {e.lower() for e in extra}
    flags = []
    for i, t in enumerate(tokens):
        cap = t[:1].isupper() and t.isascii()
        flags.append(bool(
            any(c.isdigit() for c in t) or _PLACEHOLDER.fullmatch(t) or t.lower() in extra_l
            or (t.isascii() and t.isalpha() and len(t) > 1 and t.isupper())
            or (cap and (i > 0 or (t.lower() not in EN_STOP and t.lower() not in known))) or _PUNCT.match(t)))
    return flags


class Augmenter:
    """EDA over one language-aware tokenization; ``augment(text)`` -> [(op, candidate)]."""

    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg or AugmentConfig()
        self.syn = {"en": read_synonyms(self.cfg.synonyms_en or SYNONYM_DIR / "en.txt"),
                    "zh": read_synonyms(self.cfg.synonyms_zh or SYNONYM_DIR / "zh.txt")}
        self.max_len = {lang: max((len(k) for k in t), default=1) for lang, t in self.syn.items()}
        self.known = frozenset(w for k in self.syn["en"] for w in k)

    def _spans(self, toks: list[str], prot: list[bool], lang: str) -> list[tuple[int, int, list[tuple[str, ...]]]]:
        """(start, length, synonyms) for every unprotected phrase with synonyms, longest match first."""
        out = []
        low = [t.lower() for t in toks]
        for i in range(len(toks)):
            for n in range(min(self.max_len[lang], len(toks) - i), 0, -1):
                key = tuple(low[i:i + n])
                if key in self.syn[lang] and not any(prot[i:i + n]):
                    out.append((i, n, self.syn[lang][key]))
                    break
        return out

    def one(self, text: str, op: str, rng: random.Random) -> str:
        lang = text_lang(text)
        toks = tokenize(text, lang)
        prot = protected(toks, self.cfg.protect, self.known)
        words = [i for i, p in enumerate(prot) if not p]
        n = max(1, round(self.cfg.alpha * len(words)))
        if op == "synonym":
            spans = self._spans(toks, prot, lang)
            rng.shuffle(spans)
            chosen = sorted(spans[:n], reverse=True)  # right to left keeps earlier indices valid
            used: set[int] = set()
            for i, ln, syns in chosen:
                if used & set(range(i, i + ln)):
                    continue
                used |= set(range(i, i + ln))
                rep = list(rng.choice(syns))
                if i == 0 and lang == "en" and toks[0][:1].isupper():
                    rep[0] = rep[0][:1].upper() + rep[0][1:]
                toks[i:i + ln] = rep
        elif op == "insert":
            for _ in range(n):
                spans = self._spans(toks, protected(toks, self.cfg.protect, self.known), lang)
                if not spans:
                    break
                _, _, syns = rng.choice(spans)
                at = rng.randrange(len(toks) + 1)
                toks[at:at] = list(rng.choice(syns))
        elif op == "swap":
            for _ in range(n):
                if len(words) < 2:
                    break
                a, b = rng.sample(words, 2)
                toks[a], toks[b] = toks[b], toks[a]
        elif op == "delete":
            keep = [t for t, p in zip(toks, prot) if p or rng.random() >= self.cfg.alpha]
            if sum(not p for p in protected(keep, self.cfg.protect, self.known)) == 0 and words:
                keep = toks  # never delete every word
            toks = keep
        if toks and toks[0][:1].islower() and lang == "en" and text[:1].isupper():
            toks[0] = toks[0][:1].upper() + toks[0][1:]
        return detokenize(toks, lang)

    def augment(self, text: str, rng: random.Random) -> list[tuple[str, str]]:
        return [(op, self.one(text, op, rng)) for op in (self.cfg.ops[k % len(self.cfg.ops)]
                                                         for k in range(self.cfg.n_aug))]


def _quality_reason(orig: str, cand: str, prot_tokens: Counter) -> str | None:
    from lmstack.text.lang import detect_language

    if detect_language(orig)[0] != detect_language(cand)[0]:
        return "language_changed"
    lo, lc = text_lang(orig), text_lang(cand)
    if lo != lc:
        return "language_changed"
    if len(tokenize(cand, lc)) < 0.5 * len(tokenize(orig, lo)):
        return "too_short"
    have = Counter(tokenize(cand, lc))
    if any(have[t] < c for t, c in prot_tokens.items()):
        return "protected_token_lost"
    return None


def augment_records(rows: Sequence[dict[str, Any]], cfg: AugmentConfig | None = None, text_field: str = "text"
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Augmented copies of ``rows`` (the originals are not included) and a report: candidates made, kept, and
    rejected per filter and reason. Each copy keeps its record's fields and adds ``augmented_from`` (the row
    index) and ``augment_op``."""
    from lmstack.text.normalize import dedup_key_text

    cfg = cfg or AugmentConfig()
    aug = Augmenter(cfg)
    known = aug.known
    rng = random.Random(cfg.seed)
    seen = {dedup_key_text(r[text_field]) for r in rows}
    out: list[dict[str, Any]] = []
    rejected: Counter = Counter()
    per_op: Counter = Counter()
    made = 0
    for i, r in enumerate(rows):
        text = r.get(text_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"record {i}: expected a non-empty string {text_field!r}")
        text = text[:MAX_TEXT_CHARS]
        lang = text_lang(text)
        toks = tokenize(text, lang)
        prot = Counter(t for t, p in zip(toks, protected(toks, cfg.protect, known)) if p and not _PUNCT.match(t))
        for op, cand in aug.augment(text, rng):
            made += 1
            key = dedup_key_text(cand)
            if cfg.dedup and key in seen:
                rejected["dedup:exact"] += 1
                continue
            reason = _quality_reason(text, cand, prot) if cfg.quality else None
            if reason:
                rejected[f"quality:{reason}"] += 1
                continue
            seen.add(key)
            per_op[op] += 1
            out.append({**r, text_field: cand, "augmented_from": i, "augment_op": op})
    report = {"records": len(rows), "candidates": made, "kept": len(out), "rejected": dict(sorted(rejected.items())),
              "kept_per_op": dict(sorted(per_op.items()))}
    return out, report


def augment_file(path: str | Path, out: str | Path, cfg: AugmentConfig | None = None, *, text_field: str = "text",
                 include_original: bool = True, max_bytes: int = 256 << 20,
                 method: Callable[[list[dict[str, Any]]], tuple[list[dict[str, Any]], dict[str, Any]]] | None = None
                 ) -> dict[str, Any]:
    """Read JSON Lines records from ``path``, write the originals (unless ``include_original`` is off) followed by
    their filtered augmented copies to ``out``; returns the report (also written to ``out``'s ``.report.json``).
    ``method(rows) -> (copies, report)`` replaces EDA (e.g. back-translation, :mod:`lmstack.data.backtranslate`)."""
    from lmstack.utils.io import atomic_write_json, iter_jsonl_lines, write_jsonl

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: input file not found")
    if p.stat().st_size > max_bytes:
        raise DataError(f"{p}: {p.stat().st_size:,} bytes is over the {max_bytes:,}-byte limit")

    def bad(lineno: int, reason: str) -> None:
        raise DataError(f"{p}:{lineno}: {reason}")

    rows = []
    for lineno, r in iter_jsonl_lines(p, bad):
        if not isinstance(r, dict) or not isinstance(r.get(text_field), str) or not r[text_field].strip():
            bad(lineno, f'expected an object with a non-empty string "{text_field}"')
        rows.append(r)
    if not rows:
        raise DataError(f"{p}: no records")
    aug, report = method(rows) if method is not None else augment_records(rows, cfg, text_field)
    write_jsonl(out, (rows if include_original else []) + aug)
    report["output"] = str(out)
    atomic_write_json(Path(str(out) + ".report.json"), report)
    return report
