"""Back-translation (Sennrich et al. 2016): a text goes to a pivot language and back (EN -> ZH -> EN,
ZH -> EN -> ZH) with a model lmstack runs; the round trip is a paraphrase that keeps the meaning when the model
translates well, and drifts when it does not, so every candidate passes a **round-trip similarity filter**:
chrF (Popović 2015, character n-gram F-score, sacrebleu's implementation; it works for Chinese characters as for
English words) between the original and the round trip must reach ``min_similarity``. A round trip identical to
the original adds nothing and is rejected by the exact-dedup filter; then the augmentation quality gate
(:mod:`lmstack.data.augment`: same language, at least half of the words, every protected token -- numbers, PII
placeholders, names -- still there). Each rejection is counted by reason.

The translator is any ``translate(texts, src, tgt) -> texts`` callable: :func:`lmstack.serve.translate.llm_translator`
prompts a decoder (e.g. Gemma 3 270M, multilingual) through lmstack's engine; tests pass a stub.
"""

from __future__ import annotations

import re

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from lmstack.errors import ConfigError, DataError

Translate = Callable[[list[str], str, str], list[str]]
PIVOT = {"en": "zh", "zh": "en"}
MAX_TEXT_CHARS = 2000


@dataclass
class BacktranslateConfig:
    min_similarity: float = 0.4  # chrF / 100 between the original and its round trip
    dedup: bool = True
    quality: bool = True
    protect: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_similarity <= 1.0:
            raise ConfigError(f"--min-similarity must be in [0, 1], got {self.min_similarity}")


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence chrF in [0, 1] (sacrebleu's CHRF, character 6-grams, beta 2)."""
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(hypothesis, [reference]).score / 100.0


# a translator that repeats its instruction (a base model, not tuned to follow one) has translated nothing,
# even when the repeated instruction happens to share enough character n-grams with the text to pass chrF
_ECHO = re.compile(r"translate the following|reply with the translation only|翻译成|请翻译", re.IGNORECASE)


def backtranslate_records(rows: Sequence[dict[str, Any]], translate: Translate, cfg: BacktranslateConfig | None = None,
                          text_field: str = "text") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Round-trip copies of ``rows`` that pass the filters, and a report: candidates, kept, rejected per reason,
    the similarity of every candidate (quartiles). Each copy keeps its record's fields and adds
    ``augmented_from``, ``augment_op`` ("backtranslate:en-zh-en"), ``pivot_text`` and ``roundtrip_similarity``."""
    from lmstack.data.augment import _PUNCT, AugmentConfig, Augmenter, _quality_reason, protected, text_lang, tokenize
    from lmstack.text.normalize import dedup_key_text

    cfg = cfg or BacktranslateConfig()
    known = Augmenter(AugmentConfig()).known  # the synonym vocabulary: a capitalised common word is not a name
    texts = []
    for i, r in enumerate(rows):
        t = r.get(text_field)
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"record {i}: expected a non-empty string {text_field!r}")
        texts.append(t[:MAX_TEXT_CHARS])
    langs = [text_lang(t) for t in texts]
    back: dict[int, tuple[str, str, str]] = {}  # row -> (pivot language, pivot text, round trip)
    for src, pivot in PIVOT.items():
        idx = [i for i, lang in enumerate(langs) if lang == src]
        if not idx:
            continue
        there = translate([texts[i] for i in idx], src, pivot)
        again = translate(list(there), pivot, src)
        if len(there) != len(idx) or len(again) != len(idx):
            raise DataError(f"the translator returned {len(there)} / {len(again)} texts for {len(idx)}")
        for i, p, b in zip(idx, there, again):
            back[i] = (pivot, p, b)
    seen = {dedup_key_text(t) for t in texts}
    out: list[dict[str, Any]] = []
    rejected: Counter = Counter()
    sims: list[float] = []
    for i, r in enumerate(rows):
        if i not in back:
            rejected["skipped:language"] += 1  # neither en nor zh: no pivot
            continue
        pivot, ptext, cand = back[i]
        cand = cand.strip()
        if not cand:
            rejected["translate:empty"] += 1
            continue
        if (_ECHO.search(ptext) or _ECHO.search(cand)) and not _ECHO.search(texts[i]):
            rejected["translate:prompt_echo"] += 1
            continue
        sim = chrf(cand, texts[i])
        sims.append(sim)
        if sim < cfg.min_similarity:
            rejected["roundtrip:low_similarity"] += 1
            continue
        key = dedup_key_text(cand)
        if cfg.dedup and key in seen:
            rejected["dedup:exact"] += 1
            continue
        if cfg.quality:
            toks = tokenize(texts[i], langs[i])
            prot = Counter(t for t, p in zip(toks, protected(toks, cfg.protect, known)) if p and not _PUNCT.match(t))
            reason = _quality_reason(texts[i], cand, prot)
            if reason:
                rejected[f"quality:{reason}"] += 1
                continue
        seen.add(key)
        out.append({**r, text_field: cand, "augmented_from": i, "augment_op": f"backtranslate:{langs[i]}-{pivot}-"
                    f"{langs[i]}", "pivot_text": ptext, "roundtrip_similarity": round(sim, 4)})
    q = sorted(sims)
    report = {"records": len(rows), "candidates": len(back), "kept": len(out), "rejected": dict(sorted(rejected.items())),
              "min_similarity": cfg.min_similarity,
              "similarity_quartiles": [round(q[int(k * (len(q) - 1))], 4) for k in (0, .25, .5, .75, 1)] if q else []}
    return out, report
