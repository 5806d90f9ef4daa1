"""``lmstack finetune``, ``lmstack align dpo``, ``lmstack distill``, ``lmstack merge``.

Each parses its flags into a config (recipe YAML + ``--section.key value`` / ``--section.key=value``
overrides) and calls one function of :mod:`lmstack.tune`.
"""

from __future__ import annotations

import typer

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _overrides(args: list[str]) -> list[str]:
    """``--lora.r 16 --train.lr=1e-4 --data.packing`` -> ``["lora.r=16", "train.lr=1e-4", "data.packing=true"]``."""
    from lmstack.errors import ConfigError

    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}; overrides look like --section.key value")
        key = a[2:]
        if "=" in key:
            out.append(key)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(f"{key}={args[i + 1]}")
            i += 1
        else:
            out.append(f"{key}=true")
        i += 1
    return out


def _set(overrides: list[str], **fields: object) -> list[str]:
    """Flag values given explicitly come before generic overrides (which may refine them)."""
    return [f"{k}={v}" for k, v in fields.items() if v is not None] + overrides


def _summary(res) -> str:
    where = res.final_dir or res.checkpoint_dir
    val = f", best val loss {res.best_val_loss:.4f}" if res.best_val_loss is not None else ""
    return f"{res.stopped}: {res.steps} steps, last loss {res.last_loss:.4f}{val}; output: {where}"


def register(app: typer.Typer) -> None:
    @app.command("finetune", context_settings=_EXTRA)
    def finetune_cmd(
        ctx: typer.Context,
        config: str = typer.Option(None, "--config", "-c", help="Recipe YAML (recipes/finetune-*.yaml)."),
        model: str = typer.Option(None, "--model", help="Base model directory."),
        data: str = typer.Option(None, "--data", help="SFT data: JSONL/JSON instruction, chat or ShareGPT."),
        method: str = typer.Option(None, "--method", help="full | lora | qlora | prompt | prefix"),
        run_dir: str = typer.Option(None, "--run-dir", help="Output run directory."),
        resume: str = typer.Option(None, "--resume", help="'auto' or a checkpoint path."),
    ) -> None:
        """Supervised fine-tuning (assistant tokens only) with full, LoRA, QLoRA, prompt or prefix tuning.

        Any field can be overridden: --lora.r 16 --lora.target_modules all-linear --train.steps 500."""
        from lmstack.pipeline import stage_config
        from lmstack.tune.config import FinetuneConfig
        from lmstack.tune.sft import finetune

        ov = _set(_overrides(list(ctx.args)), model=model, **{"data.path": data, "method": method,
                                                              "run_dir": run_dir, "train.resume": resume})
        res = finetune(stage_config(FinetuneConfig, config, "finetune", ov))
        typer.echo(_summary(res))
        res.raise_if_interrupted("finetuning")

    align = typer.Typer(help="Preference alignment.", no_args_is_help=True)
    app.add_typer(align, name="align")

    @align.command("dpo", context_settings=_EXTRA)
    def dpo_cmd(
        ctx: typer.Context,
        config: str = typer.Option(None, "--config", "-c", help="Recipe YAML (recipes/dpo-*.yaml)."),
        model: str = typer.Option(None, "--model", help="The (SFT) model to align; also the reference."),
        data: str = typer.Option(None, "--data", help="Preference pairs: JSONL prompt / chosen / rejected."),
        method: str = typer.Option(None, "--method", help="full | lora | qlora"),
        run_dir: str = typer.Option(None, "--run-dir"),
        resume: str = typer.Option(None, "--resume"),
    ) -> None:
        """Direct Preference Optimization; logs reward margins and preference accuracy. --dpo.beta 0.1"""
        from lmstack.pipeline import stage_config
        from lmstack.tune.config import DPOConfig
        from lmstack.tune.dpo import align_dpo

        ov = _set(_overrides(list(ctx.args)), model=model, **{"data.path": data, "method": method,
                                                              "run_dir": run_dir, "train.resume": resume})
        res = align_dpo(stage_config(DPOConfig, config, "dpo", ov))
        typer.echo(_summary(res))
        res.raise_if_interrupted("DPO")

    @app.command("distill", context_settings=_EXTRA)
    def distill_cmd(
        ctx: typer.Context,
        config: str = typer.Option(None, "--config", "-c", help="Recipe YAML (recipes/distill-*.yaml)."),
        teacher: str = typer.Option(None, "--teacher", help="Teacher model directory."),
        student: str = typer.Option(None, "--student", help="Student model directory (same vocabulary)."),
        data: str = typer.Option(None, "--data", help="SFT data file."),
        method: str = typer.Option(None, "--method", help="full | lora | qlora (of the student)"),
        run_dir: str = typer.Option(None, "--run-dir"),
        resume: str = typer.Option(None, "--resume"),
    ) -> None:
        """Knowledge distillation: KL to the teacher's softened distribution + cross-entropy."""
        from lmstack.pipeline import stage_config
        from lmstack.tune.config import DistillConfig
        from lmstack.tune.distill import distill

        ov = _set(_overrides(list(ctx.args)), teacher=teacher, student=student,
                  **{"data.path": data, "method": method, "run_dir": run_dir, "train.resume": resume})
        res = distill(stage_config(DistillConfig, config, "distill", ov))
        typer.echo(_summary(res))
        res.raise_if_interrupted("distillation")

    @app.command("merge")
    def merge_cmd(
        model: str = typer.Option(..., "--model", help="Base model directory."),
        adapter: str = typer.Option(..., "--adapter", help="LoRA adapter directory (PEFT layout)."),
        out: str = typer.Option(..., "--out", help="Output model directory."),
        dtype: str = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16 (default: fp32)"),
        allow_base_mismatch: bool = typer.Option(
            False, "--allow-base-mismatch", help="Merge even if the adapter was trained on another base model."),
    ) -> None:
        """Fold a LoRA adapter into the base weights; writes a plain Hugging Face model directory."""
        from lmstack.tune.merge import merge_adapter

        typer.echo(f"merged model: {merge_adapter(model, adapter, out, dtype, allow_base_mismatch)}")
