"""The arith app's stages: ``data`` (the synthetic task), ``model`` (a byte-level BPE that keeps digits apart and
an untrained micro model), ``report`` (held-out accuracy per language, SFT vs GRPO vs PPO, with Wilson
intervals and a two-proportion test). ``finetune``, ``grpo`` and ``ppo`` are the library's stages."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmstack.pipeline import Recipe, StageContext
from lmstack.utils.io import atomic_write_json


def section(recipe: Recipe, name: str) -> Any:
    from lmstack.apps.arith.pipeline import APP

    return APP.registry[name].configure(recipe)


def data_dir(r: Recipe) -> Path:
    return r.run_path / "data"


def model_dir(r: Recipe) -> Path:
    return r.run_path / "init" / "model"


def sft_dir(r: Recipe) -> Path:
    return Path(section(r, "finetune").run_dir) / "final"


def _threads(r: Recipe) -> None:
    import torch

    n = section(r, "init").threads
    if n:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ data
def run_data(ctx: StageContext) -> dict[str, Any]:
    from lmstack.rl.tasks import write_arithmetic

    c = ctx.config
    files = write_arithmetic(ctx.out_dir, n_sft=c.n_sft, n_train=c.n_train, n_heldout=c.n_heldout, digits=c.digits,
                             ops=c.ops, zh_fraction=c.zh_fraction, seed=ctx.recipe.seed)
    langs: dict[str, int] = {}
    for line in Path(files["heldout"]).read_text(encoding="utf-8").splitlines():
        lang = json.loads(line)["lang"]
        langs[lang] = langs.get(lang, 0) + 1
    ctx.log(f"{c.n_sft} SFT chats, {c.n_train} RL prompts, {c.n_heldout} held-out ({langs})")
    return {"sft": c.n_sft, "train": c.n_train, "heldout": c.n_heldout, "heldout_by_lang": langs, "files": files}


# ------------------------------------------------------------------------------------------------ model
def run_model(ctx: StageContext) -> dict[str, Any]:
    """The tokenizer (trained on the SFT chats' text) and the untrained model the SFT stage starts from."""
    from lmstack.model import build_model, preset, save_model
    from lmstack.tokenizer.train import train_tokenizer

    c = ctx.config
    _threads(ctx.recipe)

    def texts():
        with open(data_dir(ctx.recipe) / "sft.jsonl", encoding="utf-8") as f:
            for line in f:
                yield " ".join(m["content"] for m in json.loads(line)["messages"])

    tok_dir = ctx.out_dir / "tokenizer"
    tok = train_tokenizer(texts(), c.vocab_size, tok_dir, show_progress=False, split_digits=True)
    mc = preset(c.preset, **{**c.shape, "vocab_size": len(tok), "max_position_embeddings": c.max_position_embeddings,
                             "tie_word_embeddings": True})
    model = build_model(mc, device="cpu", dtype="fp32", seed=ctx.recipe.seed)
    save_model(model, ctx.out_dir / "model", tokenizer_dir=tok_dir)
    ctx.log(f"tokenizer {len(tok)} tokens; model {mc.num_parameters():,} parameters (untrained)")
    return {"vocab": len(tok), "parameters": mc.num_parameters(), "model_dir": str(ctx.out_dir / "model"),
            "shape": {k: getattr(mc, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads")}}


def run_finetune(ctx: StageContext) -> dict[str, Any]:
    from lmstack.pipeline.stages import run_finetune as library_finetune

    _threads(ctx.recipe)
    return library_finetune(ctx)


# ------------------------------------------------------------------------------------------------ report
def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (Wilson 1927)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


def two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test (H0: the same accuracy)."""
    if n1 == 0 or n2 == 0:
        return 1.0
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (k2 / n2 - k1 / n1) / se
    return math.erfc(abs(z) / math.sqrt(2))


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def accuracy_rows(ev: dict[str, Any], z: float) -> dict[str, Any]:
    """An rl_eval.json ``before`` / ``after`` block -> {all, en, zh: {n, correct, accuracy, ci}}."""
    out: dict[str, Any] = {}
    n_by = dict(ev.get("n_by_lang") or {})
    for key, n in (("all", ev.get("n")), *sorted(n_by.items())):
        acc = ev.get("val_accuracy" if key == "all" else f"val_accuracy_{key}")
        if acc is None or not n:
            continue
        k = round(acc * n)
        out[key] = {"n": n, "correct": k, "accuracy": k / n, "ci": list(wilson(k, n, z))}
    return out


def run_report(ctx: StageContext) -> dict[str, Any]:
    """SFT (the RL runs' "before": the same greedy decoding of the same held-out questions) vs after each RL run."""
    z = _z(ctx.config.confidence)
    systems: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for name in ("grpo", "ppo"):
        if name not in ctx.recipe.stages:
            continue
        run_dir = Path(section(ctx.recipe, name).run_dir)
        ev = json.loads((run_dir / "rl_eval.json").read_text(encoding="utf-8"))
        if "sft" not in systems:
            systems["sft"] = accuracy_rows(ev["before"], z)
        systems[name] = {**accuracy_rows(ev["after"], z), "seconds": ev.get("seconds")}
        curves[name] = {"metrics": str(run_dir / "metrics.jsonl"), "loss_png": str(run_dir / "loss.png"),
                        "rewards_png": str(run_dir / "rewards.png")}
    tests = {}
    base = systems.get("sft", {})
    for name in ("grpo", "ppo"):
        for lang, row in systems.get(name, {}).items():
            if isinstance(row, dict) and lang in base:
                b = base[lang]
                tests[f"{name}_{lang}"] = {"delta": row["accuracy"] - b["accuracy"],
                                           "p_value": two_proportion_p(b["correct"], b["n"], row["correct"], row["n"])}
    res = {"confidence": ctx.config.confidence, "systems": systems, "vs_sft": tests, "curves": curves}
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ctx.out_dir / "accuracy.json", res)
    _plot(ctx.recipe, ctx.out_dir / "accuracy.png")
    for name, row in systems.items():
        ctx.log(f"{name}: " + ", ".join(f"{lang} {v['correct']}/{v['n']} = {v['accuracy']:.3f} "
                                        f"[{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
                                        for lang, v in row.items() if isinstance(v, dict)))
    return res


def _plot(recipe: Recipe, dest: Path) -> Path | None:
    """Held-out accuracy (EN, ZH) per step of the GRPO and PPO runs."""
    from lmstack.train.metrics import read_metrics

    series = []
    for name in ("grpo", "ppo"):
        p = Path(section(recipe, name).run_dir) / "metrics.jsonl" if name in recipe.stages else None
        if p is None or not p.is_file():
            continue
        recs = read_metrics(p)
        for key in ("val_accuracy_en", "val_accuracy_zh"):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if pts:
                series.append((f"{name} {key.rsplit('_', 1)[1]}", pts))
    if not series:
        return None
    from lmstack.utils.plot import new_figure, save_png

    fig = new_figure(7, 4)
    ax = fig.subplots()
    for label, pts in series:
        ax.plot(*zip(*pts), "o-", ms=3, label=label)
    ax.set_xlabel("RL step (0 = the SFT model)")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, dest)
