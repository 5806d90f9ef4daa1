"""The two-stage screen: a light classifier scores every item; only its uncertain band goes to the LLM, whose
output is forced into a JSON verdict ``{"label": "fraud" | "legit", "reason": "..."}``.

* stage 1: :class:`lmstack.model.classify.Classifier` (the BERT-style encoder with a head), its linears swapped
  for int8 ones (:func:`lmstack.quant.quantize_linears`), gives ``p = P(fraud)``.
* the operating threshold ``t`` is chosen on dev data: the smallest ``t`` whose dev false-positive rate is at most
  ``target_fpr`` (:func:`threshold_at_fpr`); the band ``[lo, hi)`` around it holds ``band_share`` of the dev items
  (:func:`band_around`). ``p >= hi``: fraud; ``p < lo``: legit; otherwise the LLM decides.
* stage 2: the engine (:class:`lmstack.serve.LLM`) with ``SamplingParams.structured`` = the verdict schema; the
  model cannot answer anything but a parseable verdict (a max_tokens cut is the only way out: then the
  classifier's side of ``t`` decides, and the report counts it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["fraud", "legit"]},
                   "reason": {"type": "string", "maxLength": 80}},
    "required": ["label", "reason"], "additionalProperties": False}

SYSTEM_PROMPT = ("You screen card payments for fraud. Fraud: account takeover (new device, foreign country, night, "
                 "resale goods) or a customer pushed by a scammer (a 'safe account', police or tax threats, gift "
                 "card codes, guaranteed returns, 安全账户, 刷单). Legit: ordinary spending, trips, family transfers "
                 "with a plain message. Answer with JSON: label and a short reason.")
FEW_SHOT = [
    ("amount 2250.00 USD; category transfer; hour 14; known device; home country; account age 900 days; "
     "message: the bank's security team told me to move my savings to a safe account",
     {"label": "fraud", "reason": "a scammer's 'safe account' transfer"}),
    ("amount 45.10 CNY; category grocery; hour 18; known device; home country; account age 1200 days; "
     "message: 每周买菜", {"label": "legit", "reason": "ordinary grocery spending"}),
]


# ------------------------------------------------------------------------------------------- thresholds
def fpr_tpr(scores: Sequence[float], gold: Sequence[int], t: float) -> tuple[float, float]:
    """(false-positive rate, true-positive rate) of the rule ``score >= t`` (gold 1 = fraud)."""
    pos = sum(gold) or 1
    neg = (len(gold) - sum(gold)) or 1
    tp = sum(s >= t and g for s, g in zip(scores, gold))
    fp = sum(s >= t and not g for s, g in zip(scores, gold))
    return fp / neg, tp / pos


def threshold_at_fpr(scores: Sequence[float], gold: Sequence[int], target_fpr: float) -> float:
    """The smallest threshold among the scores (and 1 + max) whose rule ``score >= t`` has FPR <= target:
    the most recall the target allows on this data."""
    cands = sorted(set(scores)) + [max(scores, default=0.0) + 1.0]
    for t in cands:
        if fpr_tpr(scores, gold, t)[0] <= target_fpr:
            return float(t)
    return cands[-1]


def band_around(scores: Sequence[float], t: float, share: float) -> tuple[float, float]:
    """``(lo, hi)`` with ``lo <= t <= hi`` such that about ``share`` of ``scores`` lie in ``[lo, hi)``: the
    items nearest ``t`` in rank, half below it and half at or above it (fewer where one side runs out)."""
    if share <= 0:
        return t, t
    s = sorted(scores)
    k = round(share * len(s))
    below = [x for x in s if x < t]
    above = [x for x in s if x >= t]
    nb = min(len(below), max(k // 2, k - len(above)))
    na = min(len(above), k - nb)
    lo = below[-nb] if nb else t
    hi = above[na] if na < len(above) else max(s, default=t) + 1.0
    return float(lo), float(max(hi, t))


# ------------------------------------------------------------------------------------------- stage 1
class Stage1:
    """The classifier, int8 (``quantize=True``) or float; ``scores(texts)`` -> P(fraud) per text."""

    def __init__(self, model_dir: str | Path, quantize: bool = True):
        from lmstack.model.classify import Classifier

        self.clf = Classifier(model_dir)
        names = self.clf.model.config.id2label
        self.fraud = next(int(i) for i, n in names.items() if n == "fraud")
        self.quantized: list[str] = []
        if quantize:
            from lmstack.quant import quantize_linears

            self.quantized = quantize_linears(self.clf.model, "int8", skip=())

    def scores(self, texts: Sequence[str], batch_size: int = 64) -> list[float]:
        return [float(x) for x in self.clf.probabilities(list(texts), batch_size)[:, self.fraud]]


# ------------------------------------------------------------------------------------------- stage 2
def verdict_messages(text: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
    for shot, ans in FEW_SHOT:
        msgs += [{"role": "user", "content": shot}, {"role": "assistant", "content": json.dumps(ans, ensure_ascii=False)}]
    return msgs + [{"role": "user", "content": text}]


def parse_verdict(text: str) -> dict[str, Any] | None:
    """The verdict the constrained output spells, or None for a cut (unfinished) one."""
    try:
        v = json.loads(text)
    except ValueError:
        return None
    if not isinstance(v, dict) or v.get("label") not in ("fraud", "legit"):
        return None
    return {"label": v["label"], "reason": str(v.get("reason", ""))[:80]}


class Stage2:
    """The LLM judge through the engine, every answer constrained to :data:`VERDICT_SCHEMA`."""

    def __init__(self, llm: Any, max_tokens: int = 48):
        from lmstack.serve.types import SamplingParams, StructuredOutput

        self.llm = llm
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                     structured=StructuredOutput.schema(VERDICT_SCHEMA))

    def judge(self, texts: Sequence[str]) -> list[dict[str, Any] | None]:
        """Verdicts for ``texts``, batched through the engine (continuous batching)."""
        if not texts:
            return []
        prompts = [self.llm.chat_prompt(verdict_messages(t)) for t in texts]
        outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [parse_verdict(o.outputs[0].text) for o in outs]


@dataclass
class Screen:
    """Both stages and the band chosen on dev data."""

    stage1: Stage1
    stage2: Stage2 | None
    threshold: float
    lo: float
    hi: float

    def decide(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """One decision per text: ``{label, score, by: classifier|llm|fallback, reason}``."""
        t0 = time.perf_counter()
        p = self.stage1.scores(texts)
        out = [{"score": round(s, 4), "label": "fraud" if s >= self.hi else "legit", "by": "classifier",
                "reason": None} for s in p]
        band = [i for i, s in enumerate(p) if self.lo <= s < self.hi]
        if band and self.stage2 is not None:
            for i, v in zip(band, self.stage2.judge([texts[i] for i in band])):
                if v is None:  # the verdict was cut short: the classifier's side of the threshold decides
                    out[i].update(label="fraud" if p[i] >= self.threshold else "legit", by="fallback")
                else:
                    out[i].update(label=v["label"], by="llm", reason=v["reason"])
        elif band:
            for i in band:
                out[i].update(label="fraud" if p[i] >= self.threshold else "legit")
        ms = (time.perf_counter() - t0) * 1000 / max(len(texts), 1)
        for o in out:
            o["ms_per_item"] = round(ms, 2)
        return out


def load_screen(bundle_dir: str | Path, llm: bool = True) -> Screen:
    """The screen a bundle describes (``runs/screen/bundle``): classifier (int8 as measured), LLM, threshold, band."""
    from lmstack.apps.bundle import read_bundle
    from lmstack.errors import CheckpointError

    b = read_bundle(bundle_dir, app="screen")
    s = b.settings
    try:
        t, (lo, hi) = float(s["threshold"]), (float(x) for x in s["band"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{b.root}: manifest settings need threshold and band [lo, hi]") from None
    s1 = Stage1(b.part("classifier"), quantize=bool(s.get("int8", True)))
    s2 = None
    if llm and b.part("model") is not None:
        import lmstack

        s2 = Stage2(lmstack.load(b.part("model"), max_num_seqs=16), int(s.get("max_tokens", 48)))
    return Screen(s1, s2, t, lo, hi)
