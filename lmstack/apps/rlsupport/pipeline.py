"""The rlsupport app as a pipeline (``recipes/rl-support.yaml``): pairs -> policy -> reward -> ppo -> eval, on a
finished support run (``pairs.support_run``, default runs/quickstart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.apps.rlsupport import recipe as cfg
from lmstack.apps.rlsupport import stages as st
from lmstack.pipeline import App, Recipe, Stage, register_app
from lmstack.pipeline.report import fmt, print_table, table
from lmstack.pipeline.runner import PipelineResult
from lmstack.pipeline.stages import reward_stage, rl_stage


def _deps(*names: str):
    return lambda r: [n for n in names if n in r.stages]


def _check(r: Recipe) -> None:
    s = set(r.stages)
    for name, needs in (("policy", {"pairs"}), ("reward", {"pairs", "policy"}), ("ppo", {"pairs", "policy", "reward"}),
                        ("eval", {"pairs", "policy"})):
        if name in s and not needs <= s:
            raise ValueError(f"the {name} stage needs the {' and '.join(sorted(needs - s))} stage")


def _support_input(r: Recipe) -> dict[str, str]:
    from lmstack.utils.io import file_sha256

    p = st.support_run(r) / "rag" / "sft_train.jsonl"
    return {"chats": file_sha256(p) if p.is_file() else "missing"}


HEAD = ("assistant", "EM", "F1", "cited", "citation correct", "reward (RM)", "EN F1", "ZH F1")


def rows(res: PipelineResult) -> list[tuple[str, ...]]:
    out = []
    for name, v in (res.summary("eval").get("systems") or {}).items():
        a = v.get("all") or {}
        out.append((name, fmt(a.get("exact_match")), fmt(a.get("f1")), fmt(a.get("cited")),
                    fmt(a.get("citation_correct")), fmt(v.get("reward")), fmt((v.get("en") or {}).get("f1")),
                    fmt((v.get("zh") or {}).get("f1"))))
    return out


def print_tables(res: PipelineResult, console: Any) -> None:
    print_table(console, "held-out support questions: SFT vs after PPO", HEAD, rows(res))


APP = register_app(App(
    "rlsupport",
    description="RLHF on the support assistant: grounded-vs-bad answer pairs, a reward model, PPO on its LoRA",
    check=_check, summary=print_tables,
    report=lambda res: [f"<h2>Support scores</h2>{table(list(HEAD), rows(res))}"] if rows(res) else [],
    stages=[
        Stage("pairs", st.run_pairs, config=cfg.PairsStage, inputs=_support_input,
              description="preference pairs: grounded answer vs wrong passage / citation / number / ungrounded",
              outputs=lambda c: [c.out_dir / f"{n}.jsonl" for n in ("train_pairs", "heldout_pairs", "ppo_prompts",
                                                                    "heldout_prompts")],
              row=lambda m: f"{fmt(m.get('train_pairs'))} train / {fmt(m.get('heldout_pairs'))} held-out pairs"),
        Stage("policy", st.run_policy, config=cfg.PolicyStage, deps=_deps("pairs"), inputs=_support_input,
              description="the SFT assistant merged; the reward model's backbone (its first layers)",
              outputs=lambda c: [c.out_dir / "model" / "config.json", c.out_dir / "rm_init" / "config.json"],
              row=lambda m: f"{fmt(m.get('layers'))} layers; reward backbone {fmt(m.get('reward_backbone_layers'))}"),
        reward_stage(wire=lambda r: {"model": str(st.rm_init_dir(r)),
                                     "data": {"path": str(st.pairs_dir(r) / "train_pairs.jsonl"),
                                              "val_path": str(st.pairs_dir(r) / "heldout_pairs.jsonl")}},
                     deps=_deps("pairs", "policy")),
        rl_stage("ppo", wire=lambda r: {"model": str(st.policy_dir(r)), "method": "lora",
                                        "data": {"path": str(st.pairs_dir(r) / "ppo_prompts.jsonl"),
                                                 "val_path": str(st.pairs_dir(r) / "heldout_prompts.jsonl")},
                                        "reward": {"model": str(Path(st.section(r, "reward").run_dir) / "final")}},
                 deps=_deps("pairs", "policy", "reward"), description="PPO on the assistant's LoRA, the reward model's score"),
        Stage("eval", st.run_eval, config=cfg.EvalStage, deps=_deps("pairs", "policy", "reward", "ppo"),
              description="held-out support scores: SFT vs SFT + PPO adapter",
              outputs=lambda c: [c.out_dir / "scores.json"],
              row=lambda m: "; ".join(f"{k} F1 {fmt((v.get('all') or {}).get('f1'))} reward {fmt(v.get('reward'))}"
                                      for k, v in (m.get("systems") or {}).items())),
    ]))
