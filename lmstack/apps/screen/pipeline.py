"""The screen app as a pipeline (``recipes/screen.yaml``, ``app: screen``): data -> classifier -> base (the LLM,
imported from GGUF) -> eval -> bundle."""

from __future__ import annotations

from pathlib import Path

from lmstack.apps.screen import recipe as cfg
from lmstack.apps.screen import report, stages as st
from lmstack.pipeline import App, Recipe, Stage, register_app
from lmstack.pipeline.stages import base_stage
from lmstack.utils.io import file_sha256, model_dir_hash


def _deps(*names: str):
    return lambda r: [n for n in names if n in r.stages]


def _check(r: Recipe) -> None:
    s = set(r.stages)
    if {"classifier", "eval", "bundle"} & s and "data" not in s:
        raise ValueError("the classifier, eval and bundle stages need the data stage")
    if {"eval", "bundle"} & s and "classifier" not in s:
        raise ValueError("eval and bundle need the classifier stage")
    if "bundle" in s and "eval" not in s:
        raise ValueError("the bundle keeps the threshold and band the eval stage chose: add the eval stage")
    if r.model is not None and "base" in s:
        raise ValueError("the LLM comes from one place: `model:` and the base stage both give one; keep one")
    if r.model is not None and not (Path(r.model) / "config.json").is_file():
        raise ValueError(f"model: {r.model} is not a Hugging Face model directory (no config.json)")
    if "eval" in s and st.section(r, "eval").llm and r.model is None and "base" not in s:
        raise ValueError("eval.llm needs an LLM: add the base stage (a GGUF file), set `model: PATH`, "
                         "or set eval.llm: false")


def _inputs(r: Recipe) -> dict[str, str]:
    return {"model": model_dir_hash(Path(r.model))} if r.model else {}


APP = register_app(App(
    "screen",
    description="two-stage risk screen: an int8 encoder classifier, the LLM (JSON verdict) on its uncertain band",
    check=_check, summary=report.print_tables, report=report.html_sections, next_commands=report.next_commands,
    stages=[
        Stage("data", st.run_data, config=cfg.DataStage, description="synthetic payments + messages, EN + ZH",
              inputs=lambda r: {"data": file_sha256(st.data_path(r)) if st.data_path(r).is_file() else "missing"},
              outputs=lambda c: [c.out_dir / f"{s}.jsonl" for s in ("train", "dev", "test")],
              row=report.data_row),
        Stage("classifier", st.run_classifier, config=cfg.ClassifierStage, deps=_deps("data"),
              description="the encoder with a classification head", row=report.classifier_row,
              outputs=lambda c: [c.out_dir / "model" / "config.json"]),
        base_stage(description="the LLM judge, imported from a GGUF file"),
        Stage("eval", st.run_eval, config=cfg.EvalStage, deps=_deps("data", "classifier", "base"), inputs=_inputs,
              description="threshold + band on dev; classifier-only vs LLM-only vs cascade on test",
              outputs=lambda c: [c.out_dir / "metrics.json"], row=report.eval_row),
        Stage("bundle", st.run_bundle, config=cfg.BundleStage, deps=_deps("classifier", "base", "eval"),
              inputs=_inputs, description="classifier + LLM + threshold and band in one directory",
              outputs=lambda c: [c.out_dir / "manifest.json"],
              row=lambda m: f"{m.get('bundle')}: {m.get('files')} files"),
    ]))
