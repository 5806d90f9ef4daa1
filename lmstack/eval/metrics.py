"""Scoring functions: text overlap, exact match / token F1, classification, pass@k.

References:
- BLEU (Papineni et al. 2002) and chrF (Popović 2015) via ``sacrebleu`` (Post 2018, "A Call for Clarity in
  Reporting BLEU Scores"); the ``zh`` tokenizer is used automatically when references contain Chinese.
- ROUGE-1/2/L (Lin 2004) via ``rouge-score``; its default tokenizer drops every non-ASCII character, so we
  pass :class:`CJKTokenizer`, which equals the default on ASCII text and splits CJK text into characters.
- Exact match / token F1: the SQuAD v1.1 evaluation script (Rajpurkar et al. 2016), CJK split per character.
- pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code"),
  ``1 - C(n-c, k) / C(n, k)``, computed as a stable product.
- Macro-F1: unweighted mean of per-class F1 over the classes present in references or predictions.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

_CJK = (r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
        r"\u3000-\u303f\uff00-\uffef")
_CJK_RE = re.compile(f"[{_CJK}]")
_CJK_CHAR = re.compile(f"[{_CJK}]")
_PUNCT = set(string.punctuation) | set("，。！？；：、“”‘’（）《》【】—…·「」『』")


def has_cjk(text: str) -> bool:
    return bool(_CJK_RE.search(text))


# ---------------------------------------------------------------------------------------------- BLEU / chrF
def _as_refs(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _ref_streams(refs: list[list[str]]) -> list[list[str]]:
    """Per-example reference lists -> sacrebleu's reference streams (one stream per reference index).

    Examples with fewer references are padded with ``None``, which sacrebleu skips."""
    width = max((len(r) for r in refs), default=1)
    return [[r[i] if i < len(r) else None for r in refs] for i in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], tokenize: str = "auto") -> float:
    """Corpus BLEU (0-100). ``tokenize="auto"``: ``zh`` when any reference contains CJK, else ``13a``."""
    import sacrebleu

    refs = _as_refs(references)
    if tokenize == "auto":
        tokenize = "zh" if any(has_cjk(r) for rs in refs for r in rs) else "13a"
    return float(sacrebleu.corpus_bleu(list(predictions), _ref_streams(refs), tokenize=tokenize).score)


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF (0-100), sacrebleu defaults (char order 6, beta 2)."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), _ref_streams(_as_refs(references))).score)


# ---------------------------------------------------------------------------------------------- ROUGE
class CJKTokenizer:
    """rouge-score tokenizer: lowercase; each CJK character is a token; other runs of [a-z0-9] are tokens.

    On ASCII text this equals rouge-score's default tokenizer (without stemming)."""

    _TOKEN = re.compile(f"[{_CJK}]|[a-z0-9]+")

    def tokenize(self, text: str) -> list[str]:
        return [t for t in self._TOKEN.findall(text.lower()) if not (len(t) == 1 and t in _PUNCT)]


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
          types: Iterable[str] = ("rouge1", "rouge2", "rougeL")) -> dict[str, float]:
    """Mean ROUGE F-measure (0-1) per type; with several references the best-scoring one counts."""
    from rouge_score import rouge_scorer

    types = list(types)
    scorer = rouge_scorer.RougeScorer(types, tokenizer=CJKTokenizer())
    totals = {t: 0.0 for t in types}
    refs = _as_refs(references)
    for pred, rs in zip(predictions, refs, strict=True):
        scores = scorer.score_multi(rs, pred) if len(rs) > 1 else scorer.score(rs[0], pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    n = max(len(refs), 1)
    return {t: v / n for t, v in totals.items()}


# ---------------------------------------------------------------------------------------------- EM / F1
def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation (ASCII and CJK) and English articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """Tokens for F1: normalised words, with CJK characters split one per token."""
    norm = normalize_answer(text)
    return _CJK_CHAR.sub(lambda m: f" {m.group(0)} ", norm).split()


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    refs = [references] if isinstance(references, str) else references
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in refs))


def contains(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when some reference's answer tokens (:func:`answer_tokens`) appear as a contiguous run of the
    prediction's: "Paris" in "The capital of France is Paris.", "7" in "A week has 7 days" but not in
    "17 days", "巴黎" in "法国的首都是巴黎。" (the "answer in output" check of open-ended QA, for a reply in
    a sentence rather than the bare answer)."""
    refs = [references] if isinstance(references, str) else references
    pt = answer_tokens(prediction)
    for r in refs:
        rt = answer_tokens(r)
        if rt and any(pt[i:i + len(rt)] == rt for i in range(len(pt) - len(rt) + 1)):
            return 1.0
    return 0.0


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token F1, the maximum over references."""
    refs = [references] if isinstance(references, str) else references
    best = 0.0
    pt = answer_tokens(prediction)
    for r in refs:
        rt = answer_tokens(r)
        if not pt and not rt:
            best = max(best, 1.0)
            continue
        common = sum((Counter(pt) & Counter(rt)).values())
        if common == 0:
            continue
        prec, rec = common / len(pt), common / len(rt)
        best = max(best, 2 * prec * rec / (prec + rec))
    return best


# ---------------------------------------------------------------------------------------------- classification
def accuracy(predictions: Sequence, references: Sequence) -> float:
    if not predictions:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(predictions)


def macro_f1(predictions: Sequence, references: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean F1 over ``labels`` (default: every label seen in references or predictions)."""
    labels = list(labels) if labels is not None else sorted(set(references) | set(predictions), key=str)
    if not labels:
        return 0.0
    f1s = []
    for lab in labels:
        tp = sum(p == lab and r == lab for p, r in zip(predictions, references))
        fp = sum(p == lab and r != lab for p, r in zip(predictions, references))
        fn = sum(p != lab and r == lab for p, r in zip(predictions, references))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


# ---------------------------------------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` passed (Chen et al. 2021)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given (n, c) per problem."""
    if not counts:
        return 0.0
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
