"""The screen app's stages: data (the items and their splits), classifier (train the encoder), eval (threshold
and band on dev; quality, latency and throughput of classifier-only, LLM-only and the cascade on test), bundle."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from lmstack.pipeline import Recipe, StageContext
from lmstack.utils.io import atomic_write_json, write_jsonl


def section(recipe: Recipe, name: str) -> Any:
    from lmstack.apps.screen.pipeline import APP

    return APP.registry[name].configure(recipe)


def data_path(recipe: Recipe) -> Path:
    from lmstack.apps.screen.data import SHIPPED

    p = section(recipe, "data").path
    if p is None:
        return SHIPPED
    q = Path(p)
    if not q.is_absolute() and not q.exists() and recipe.source:
        q = Path(recipe.source).parent / q
    return q


def llm_dir(recipe: Recipe) -> Path | None:
    if recipe.model:
        return Path(recipe.model)
    return recipe.run_path / "base" / "model" if "base" in recipe.stages else None


# ------------------------------------------------------------------------------------------------ data
def run_data(ctx: StageContext) -> dict[str, Any]:
    from lmstack.apps.screen.data import read

    rows = read(data_path(ctx.recipe))
    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Any] = {}
    for split in ("train", "dev", "test"):
        part = [r for r in rows if r["split"] == split]
        write_jsonl(out / f"{split}.jsonl", part)
        counts[split] = {"n": len(part), "fraud": sum(r["label"] == "fraud" for r in part),
                         "zh": sum(r.get("lang") == "zh" for r in part)}
    ctx.log(", ".join(f"{s} {c['n']} ({c['fraud']} fraud)" for s, c in counts.items()))
    return {"source": str(data_path(ctx.recipe)), **counts}


# ------------------------------------------------------------------------------------------------ classifier
def run_classifier(ctx: StageContext) -> dict[str, Any]:
    import torch

    from lmstack.model.classify import ClassifyConfig, train_classifier

    c, d = ctx.config, ctx.stage_dir("data")
    torch.set_num_threads(c.threads)
    m = train_classifier(ClassifyConfig(data=str(d / "train.jsonl"), eval_data=str(d / "dev.jsonl"),
                                        out=str(ctx.out_dir / "model"), epochs=c.epochs, hidden_size=c.hidden_size,
                                        num_hidden_layers=c.num_hidden_layers, vocab_size=c.vocab_size,
                                        max_length=c.max_length, lr=c.lr, seed=ctx.recipe.seed))
    ctx.log(f"dev accuracy {m.get('accuracy')}, {m['train_seconds']} s")
    return {k: m.get(k) for k in ("train_records", "accuracy", "macro_f1", "train_seconds", "final_train_loss")}


# ------------------------------------------------------------------------------------------------ eval
def quality(gold: Sequence[str], pred: Sequence[str]) -> dict[str, Any]:
    """Accuracy, recall (fraud caught), false-positive rate (legit flagged) and precision."""
    tp = sum(g == "fraud" and p == "fraud" for g, p in zip(gold, pred))
    fp = sum(g == "legit" and p == "fraud" for g, p in zip(gold, pred))
    pos, neg = sum(g == "fraud" for g in gold), sum(g == "legit" for g in gold)
    return {"n": len(gold), "accuracy": round(sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1), 4),
            "recall": round(tp / pos, 4) if pos else None, "fpr": round(fp / neg, 4) if neg else None,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None}


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile (q in [0, 100]): the smallest x with at least q% of xs <= x."""
    import math

    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def _lat(ms: Sequence[float]) -> dict[str, Any]:
    return {"p50": round(percentile(ms, 50), 1) if ms else None, "p99": round(percentile(ms, 99), 1) if ms else None,
            "mean": round(statistics.fmean(ms), 1) if ms else None, "n": len(ms)}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def run_eval(ctx: StageContext) -> dict[str, Any]:
    import torch

    from lmstack.apps.screen.cascade import Stage1, Stage2, band_around, threshold_at_fpr
    from lmstack.utils.io import iter_jsonl

    c, d = ctx.config, ctx.stage_dir("data")
    torch.set_num_threads(c.threads)
    dev, test = list(iter_jsonl(d / "dev.jsonl")), list(iter_jsonl(d / "test.jsonl"))
    clf_dir = ctx.stage_dir("classifier") / "model"
    s1 = Stage1(clf_dir, quantize=c.int8)
    dev_p = s1.scores([r["text"] for r in dev])
    dev_y = [int(r["label"] == "fraud") for r in dev]
    t = threshold_at_fpr(dev_p, dev_y, c.target_fpr)
    lo, hi = band_around(dev_p, t, c.band_share if c.llm else 0.0)
    ctx.log(f"threshold {t:.4f} (dev FPR <= {c.target_fpr}); LLM band [{lo:.4f}, {hi:.4f})")

    texts, gold = [r["text"] for r in test], [r["label"] for r in test]
    p, clf_s = _timed(lambda: s1.scores(texts))
    fp32 = Stage1(clf_dir, quantize=False).scores(texts) if c.int8 else p
    clf_pred = ["fraud" if x >= t else "legit" for x in p]
    band = [i for i, x in enumerate(p) if lo <= x < hi]
    res: dict[str, Any] = {
        "threshold": round(t, 6), "band": [round(lo, 6), round(hi, 6)], "target_fpr": c.target_fpr,
        "int8": c.int8, "int8_layers": len(s1.quantized),
        "int8_max_abs_diff": round(max((abs(a - b) for a, b in zip(p, fp32)), default=0.0), 6),
        "int8_decisions_changed": sum((a >= t) != (b >= t) for a, b in zip(p, fp32)),
        "dev": {"n": len(dev), "band_share": round(sum(lo <= x < hi for x in dev_p) / max(len(dev), 1), 4)},
        "test_n": len(test), "llm_share": round(len(band) / max(len(test), 1), 4)}
    systems: dict[str, Any] = {"classifier": {"quality": quality(gold, clf_pred),
                                              "items_per_s": round(len(test) / clf_s, 1)}}
    lat_idx = list(range(min(c.latency_items, len(test))))
    clf_lat = [_timed(lambda: s1.scores([texts[i]]))[1] * 1000 for i in lat_idx]
    systems["classifier"]["latency_ms"] = _lat(clf_lat)

    llm_path = llm_dir(ctx.recipe)
    if c.llm and llm_path is not None:
        import lmstack

        llm = lmstack.load(llm_path, max_num_seqs=16)
        s2 = Stage2(llm, c.max_tokens)
        s2.judge([texts[0]])  # warm-up: compile the grammar, build the decode kernel, fill the prefix cache
        verdicts, llm_s = _timed(lambda: s2.judge([texts[i] for i in band]))
        casc = list(clf_pred)
        cut = 0
        for i, v in zip(band, verdicts):
            if v is None:
                cut += 1
            else:
                casc[i] = v["label"]
        systems["cascade"] = {"quality": quality(gold, casc), "llm_items": len(band), "llm_cut": cut,
                              "llm_fraud_verdicts": sum(bool(v) and v["label"] == "fraud" for v in verdicts),
                              "items_per_s": round(len(test) / (clf_s + llm_s), 1)}
        # the control a weak judge needs: the same band decided by a constant ("legit" / "fraud"), no LLM at all
        for const in ("legit", "fraud"):
            ctl = [const if lo <= x < hi else c for x, c in zip(p, clf_pred)]
            res[f"band_all_{const}"] = quality(gold, ctl)
        only = list(range(min(c.llm_only_limit, len(test))))
        ov, only_s = _timed(lambda: s2.judge([texts[i] for i in only]))
        only_pred = [v["label"] if v else "legit" for v in ov]
        systems["llm_only"] = {"quality": quality([gold[i] for i in only], only_pred),
                               "llm_cut": sum(v is None for v in ov),
                               "items_per_s": round(len(only) / only_s, 2) if only else None}
        # the same items for all three, so the LLM-only row compares like with like
        res["subset"] = {"n": len(only), "classifier": quality([gold[i] for i in only], [clf_pred[i] for i in only]),
                         "cascade": quality([gold[i] for i in only], [casc[i] for i in only]),
                         "llm_only": systems["llm_only"]["quality"]}
        # latency, one item at a time: the cascade pays the LLM only for items in the band
        llm_lat = [_timed(lambda: s2.judge([texts[i]]))[1] * 1000 for i in lat_idx]
        casc_lat = [a + (b if lo <= p[i] < hi else 0.0) for i, a, b in zip(lat_idx, clf_lat, llm_lat)]
        systems["llm_only"]["latency_ms"] = _lat(llm_lat)
        systems["cascade"]["latency_ms"] = _lat(casc_lat)
        samples = [{"id": test[i]["id"], "lang": test[i]["lang"], "gold": gold[i], "score": round(p[i], 4),
                    "classifier": clf_pred[i], "verdict": v} for i, v in zip(band, verdicts)]
        write_jsonl(ctx.out_dir / "band_verdicts.jsonl", samples)
    res["systems"] = systems
    res["latency_items"] = len(lat_idx)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ctx.out_dir / "metrics.json", res)
    return res


# ------------------------------------------------------------------------------------------------ bundle
def run_bundle(ctx: StageContext) -> dict[str, Any]:
    from lmstack.apps.bundle import write_bundle
    from lmstack.apps.screen.cascade import SYSTEM_PROMPT, VERDICT_SCHEMA

    m = ctx.summaries.get("eval") or {}
    ev = section(ctx.recipe, "eval")
    llm_path = llm_dir(ctx.recipe) if ev.llm else None
    b = write_bundle(ctx.out_dir, "screen", {"classifier": ctx.stage_dir("classifier") / "model", "model": llm_path},
                     {"threshold": m["threshold"], "band": m["band"], "int8": ev.int8, "max_tokens": ev.max_tokens,
                      "target_fpr": ev.target_fpr, "schema": VERDICT_SCHEMA, "system_prompt": SYSTEM_PROMPT,
                      "recipe": ctx.recipe.name},
                     link=ctx.config.files == "link")
    return {"bundle": str(b.root), "files": len(b.files), "parts": b.parts}
