"""The arith app as a pipeline (``recipes/rl-arithmetic.yaml``): data -> model (tokenizer + an untrained micro
model) -> finetune (full SFT, stopped early at partial accuracy) -> grpo -> ppo (both with the exact-answer
reward, from the SFT model) -> report (held-out accuracy per language with Wilson intervals)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmstack.apps.arith import recipe as cfg
from lmstack.apps.arith import stages as st
from lmstack.pipeline import App, Recipe, Stage, register_app
from lmstack.pipeline.report import fmt, img, print_table, table
from lmstack.pipeline.runner import PipelineResult
from lmstack.pipeline.stages import finetune_stage, rl_stage


def _deps(*names: str):
    return lambda r: [n for n in names if n in r.stages]


def _check(r: Recipe) -> None:
    s = set(r.stages)
    for name, needs in (("init", {"data"}), ("finetune", {"data", "init"}), ("grpo", {"data", "finetune"}),
                        ("ppo", {"data", "finetune"})):
        if name in s and not needs <= s:
            raise ValueError(f"the {name} stage needs the {' and '.join(sorted(needs - s))} stage")
    if "report" in s and not {"grpo", "ppo"} & s:
        raise ValueError("the report compares the RL runs with the SFT model: add grpo and/or ppo")


def _rl_wire(r: Recipe) -> dict[str, Any]:
    d = st.data_dir(r)
    return {"model": str(st.sft_dir(r)), "method": "full",
            "data": {"path": str(d / "train.jsonl"), "val_path": str(d / "heldout.jsonl")},
            "reward": {"function": "exact_answer"}}


HEAD = ("model", "EN accuracy [95% CI]", "ZH accuracy [95% CI]", "all", "p vs SFT (all)")


def rows(res: PipelineResult) -> list[tuple[str, ...]]:
    m = res.summary("report")
    out = []
    for name, row in (m.get("systems") or {}).items():
        def cell(lang: str) -> str:
            v = row.get(lang)
            return "-" if not v else f"{v['correct']}/{v['n']} = {v['accuracy']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
        p = (m.get("vs_sft") or {}).get(f"{name}_all", {}).get("p_value")
        out.append((name, cell("en"), cell("zh"), cell("all"), "-" if p is None else f"{p:.2g}"))
    return out


def print_tables(res: PipelineResult, console: Any) -> None:
    print_table(console, "held-out arithmetic accuracy (greedy): SFT vs after RL", HEAD, rows(res))


def html(res: PipelineResult) -> list[str]:
    rs = rows(res)
    if not rs:
        return []
    png = str(res.run_dir / "report" / "accuracy.png")
    return [f"<h2>Held-out accuracy</h2>{table(list(HEAD), rs)}{img(png, 'held-out accuracy per step')}"]


_ft = finetune_stage(wire=lambda r: {"model": str(st.model_dir(r)), "method": "full",
                                     "data": {"path": str(st.data_dir(r) / "sft.jsonl")}},
                     deps=_deps("data", "init"), description="full SFT from the untrained model, stopped early")

APP = register_app(App(
    "arith",
    description="RL on a CPU: a micro model learns two-digit arithmetic (EN + ZH), then GRPO and PPO raise its "
                "held-out accuracy with an exact-answer reward",
    check=_check, summary=print_tables, report=html,
    stages=[
        Stage("data", st.run_data, config=cfg.DataStage, description="synthetic arithmetic, EN + ZH prompts",
              outputs=lambda c: [c.out_dir / f"{s}.jsonl" for s in ("sft", "train", "heldout")],
              row=lambda m: f"{fmt(m.get('sft'))} SFT, {fmt(m.get('train'))} RL, {fmt(m.get('heldout'))} held-out"),
        Stage("init", st.run_model, config=cfg.ModelStage, deps=_deps("data"),
              description="byte-level BPE (digits apart) + an untrained micro model",
              outputs=lambda c: [c.out_dir / "model" / "config.json"],
              row=lambda m: f"{fmt(m.get('parameters'))} params, vocab {fmt(m.get('vocab'))}"),
        replace(_ft, run=st.run_finetune),
        rl_stage("grpo", wire=_rl_wire, deps=_deps("data", "finetune"),
                 description="GRPO from the SFT model, exact-answer reward"),
        rl_stage("ppo", wire=_rl_wire, deps=_deps("data", "finetune"),
                 description="PPO from the SFT model, the same reward"),
        Stage("report", st.run_report, config=cfg.ReportStage, deps=_deps("finetune", "grpo", "ppo"),
              description="held-out accuracy per language, SFT vs GRPO vs PPO (Wilson intervals)",
              outputs=lambda c: [c.out_dir / "accuracy.json"],
              row=lambda m: "; ".join(f"{k} {fmt((v.get('all') or {}).get('accuracy'))}"
                                      for k, v in (m.get("systems") or {}).items())),
    ]))
