"""``lmstack align reward|ppo|grpo``: reinforcement learning from feedback (:mod:`lmstack.rl`).

The commands join the ``align`` group that ``lmstack align dpo`` (lmstack/cli/tune.py) creates; each parses
its flags into a config (YAML + ``--section.key value`` overrides) and calls one library function.
"""

from __future__ import annotations

import typer

from lmstack.cli.tune import _EXTRA, _overrides, _set


def _align_group(app: typer.Typer) -> typer.Typer:
    for g in app.registered_groups:
        if g.name == "align":
            return g.typer_instance
    align = typer.Typer(help="Preference alignment.", no_args_is_help=True)
    app.add_typer(align, name="align")
    return align


def _rl_summary(res: dict) -> str:
    b, a = res.get("before") or {}, res.get("after") or {}
    held = (f"; held-out reward {b['val_reward']:.3f} -> {a['val_reward']:.3f}"
            if "val_reward" in b and "val_reward" in a else "")
    return f"completed: {res['steps']} steps in {res['seconds']:.0f} s{held}; output: {res['final_dir']}"


def register(app: typer.Typer) -> None:
    align = _align_group(app)

    @align.command("reward", context_settings=_EXTRA)
    def reward_cmd(
        ctx: typer.Context,
        config: str = typer.Option(None, "--config", "-c", help="Recipe YAML with a reward: section."),
        model: str = typer.Option(None, "--model", help="Backbone model directory (usually the SFT model)."),
        data: str = typer.Option(None, "--data", help="Preference pairs: JSONL prompt / chosen / rejected."),
        run_dir: str = typer.Option(None, "--run-dir"),
    ) -> None:
        """Train a reward model (Bradley-Terry on preference pairs); writes a ...ForSequenceClassification dir."""
        from lmstack.pipeline import stage_config
        from lmstack.rl.config import RewardConfig
        from lmstack.rl.reward_model import train_reward

        ov = _set(_overrides(list(ctx.args)), model=model, **{"data.path": data, "run_dir": run_dir})
        res = train_reward(stage_config(RewardConfig, config, "reward", ov))
        where = res.final_dir or res.checkpoint_dir
        typer.echo(f"{res.stopped}: {res.steps} steps, last loss {res.last_loss:.4f}; output: {where}")
        res.raise_if_interrupted("reward model training")

    @align.command("ppo", context_settings=_EXTRA)
    def ppo_cmd(
        ctx: typer.Context,
        config: str = typer.Option(None, "--config", "-c", help="Recipe YAML with a ppo: section."),
        model: str = typer.Option(None, "--model", help="The (SFT) policy; with LoRA also the reference."),
        data: str = typer.Option(None, "--data", help="Prompts: JSONL with prompt (+ fields the reward reads)."),
        reward_model: str = typer.Option(None, "--reward-model", help="Reward model directory."),
        reward_fn: str = typer.Option(None, "--reward-fn", help="exact_answer | json_schema | unit_tests | mod:fn"),
        run_dir: str = typer.Option(None, "--run-dir"),
    ) -> None:
        """RLHF with PPO: value head, GAE, clipped surrogate, per-token KL to the reference (adapter off)."""
        from lmstack.pipeline import stage_config
        from lmstack.rl.config import PPOConfig
        from lmstack.rl.ppo import align_ppo

        ov = _set(_overrides(list(ctx.args)), model=model, **{"data.path": data, "reward.model": reward_model,
                                                              "reward.function": reward_fn, "run_dir": run_dir})
        typer.echo(_rl_summary(align_ppo(stage_config(PPOConfig, config, "ppo", ov))))

    @align.command("grpo", context_settings=_EXTRA)
    def grpo_cmd(
        ctx: typer.Context,
        config: str = typer.Option(None, "--config", "-c", help="Recipe YAML with a grpo: section."),
        model: str = typer.Option(None, "--model", help="The (SFT) policy; with LoRA also the reference."),
        data: str = typer.Option(None, "--data", help="Prompts: JSONL with prompt (+ fields the reward reads)."),
        reward_model: str = typer.Option(None, "--reward-model", help="Reward model directory."),
        reward_fn: str = typer.Option(None, "--reward-fn", help="exact_answer | json_schema | unit_tests | mod:fn"),
        run_dir: str = typer.Option(None, "--run-dir"),
    ) -> None:
        """GRPO: group sampling, group-normalised advantages, clipped ratio + k3 KL (DAPO / Dr. GRPO options)."""
        from lmstack.pipeline import stage_config
        from lmstack.rl.config import GRPOConfig
        from lmstack.rl.grpo import align_grpo

        ov = _set(_overrides(list(ctx.args)), model=model, **{"data.path": data, "reward.model": reward_model,
                                                              "reward.function": reward_fn, "run_dir": run_dir})
        typer.echo(_rl_summary(align_grpo(stage_config(GRPOConfig, config, "grpo", ov))))

    @align.command("arithmetic-data")
    def arithmetic_data_cmd(
        out: str = typer.Option(..., "--out", help="Directory for sft.jsonl, train.jsonl, heldout.jsonl."),
        digits: int = typer.Option(2, "--digits", min=1, max=9, help="Digits of each operand."),
        n_sft: int = typer.Option(400, "--sft", min=0), n_train: int = typer.Option(400, "--train", min=1),
        n_heldout: int = typer.Option(64, "--heldout", min=1), seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Write the synthetic arithmetic task (English and Chinese prompts, verifiable answers)."""
        from lmstack.rl.tasks import write_arithmetic

        files = write_arithmetic(out, n_sft=n_sft, n_train=n_train, n_heldout=n_heldout, digits=digits, seed=seed)
        typer.echo("wrote " + ", ".join(files.values()))
