"""``lmstack pretrain --config recipes/X.yaml [--train.lr=3e-4 ...]``: parse, build the config, call
:func:`lmstack.train.pretrain`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("pretrain", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def pretrain_cmd(
        ctx: typer.Context,
        config: str = typer.Option(None, "--config", "-c",
                                   help="Recipe YAML (recipes/pretrain-*.yaml, or run_dir/model/data/train)."),
        resume: str = typer.Option(None, "--resume", help="'auto' (newest checkpoint of run_dir) or a path."),
        tp: int = typer.Option(None, "--tp", min=1,
                               help="Tensor-parallel ranks per replica (train.tp_size); launch under torchrun."),
    ) -> None:
        """Pretrain from scratch on token shards, or continue pretraining a Hugging Face model.

        Any field can be overridden: --train.lr=3e-4 --data.batch_size=4 --model.preset=small.
        Under torchrun it runs DDP (or FSDP2 with --train.distributed=fsdp); --tp N shards each replica's
        layers over N processes (tensor parallel; FSDP2 over the rest on a 2-D mesh)."""
        import os

        from lmstack.pipeline import stage_config
        from lmstack.train import pretrain
        from lmstack.train.config import PretrainConfig

        overrides = list(ctx.args)
        if resume:
            overrides.append(f"train.resume={resume}")
        if tp:
            overrides.append(f"train.tp_size={tp}")
        cfg = stage_config(PretrainConfig, config, "pretrain", overrides)  # as `lmstack run` builds it
        res = pretrain(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            where = res.final_dir or res.checkpoint_dir
            typer.echo(f"{res.stopped}: {res.steps} steps, last loss {res.last_loss:.4f}"
                       + (f", best val loss {res.best_val_loss:.4f}" if res.best_val_loss is not None else "")
                       + f"; model: {where}; metrics: {res.metrics_path}")
        res.raise_if_interrupted("pretraining")
