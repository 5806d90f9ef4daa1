"""``lmstack finetune``: supervised fine-tuning with any method (full, LoRA, QLoRA, prompt, prefix).

Reads top to bottom: tokenizer -> data (report bad rows, hold out validation) -> model for the method ->
``lmstack.train.fit`` with the SFT loss (assistant tokens only) -> run_dir/final (model dir or adapter).
References: InstructGPT SFT stage (Ouyang et al. 2022); torchtune / LLaMA-Factory SFT recipes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from torch import Tensor, nn

from lmstack.train import FitResult, LossOutput, fit
from lmstack.tune.batches import SFTBatches, sft_eval_batches
from lmstack.tune.config import FinetuneConfig, LoraSection, PromptSection
from lmstack.tune.data import DataReport, load_sft, split_val
from lmstack.tune.losses import sft_token_loss
from lmstack.tune.lora import LoraSpec
from lmstack.tune.methods import Prepared, prepare
from lmstack.tune.prompt import PromptSpec
from lmstack.utils.io import atomic_write_json

console = Console(stderr=True)


def load_tokenizer(model_dir: str, tokenizer_dir: str | None):
    from lmstack.tokenizer import Tokenizer

    return Tokenizer.from_dir(tokenizer_dir or model_dir)


def pad_id_of(tok: Any) -> int:
    for v in (tok.pad_token_id, tok.eos_token_id):
        if v is not None:
            return int(v)
    return 0


def lora_spec(s: LoraSection) -> LoraSpec:
    return LoraSpec(r=s.r, alpha=s.alpha, dropout=s.dropout, target_modules=s.target_modules,
                    use_rslora=s.use_rslora, layers_to_transform=s.layers_to_transform)


def prompt_spec(s: PromptSection) -> PromptSpec:
    return PromptSpec(num_virtual_tokens=s.num_virtual_tokens, init=s.init)


def report_data(reports: list[DataReport], run_dir: Path) -> None:
    for r in reports:
        console.print(f"[bold]data[/bold] {r.summary()}")
    atomic_write_json(run_dir / "data_report.json", [
        {"path": r.path, "records": r.records, "used": r.used, "truncated": r.truncated,
         "bad": [{"line": ln, "reason": why} for ln, why in r.bad]} for r in reports])


def check_vocab(model_dir: str, examples: list, where: str) -> None:
    """Every token id must index the model's embedding: a tokenizer/model mismatch fails here, not mid-run."""
    from lmstack.errors import DataError
    from lmstack.model import ModelConfig

    vocab = ModelConfig.from_hf(model_dir).vocab_size
    ids = (i for e in examples for x in ((e.chosen, e.rejected) if hasattr(e, "chosen") else (e,))
           for i in x.input_ids)
    top = max(ids, default=-1)
    if top >= vocab:
        raise DataError(f"{where}: token id {top} >= the model's vocab_size {vocab} ({model_dir}); the tokenizer "
                        "does not belong to this model (set `tokenizer:` to the model's own tokenizer directory)")


def load_splits(d: Any, tok: Any, model_dir: str, seed: int, run_dir: Path,
                load: Callable[..., tuple[list, DataReport]] = load_sft) -> tuple[list, list]:
    """Load a data section ``d`` (path, max_len, val_path or val_fraction) with ``load`` (``load_sft`` for
    chats/instructions, ``load_pairs`` for preference pairs): train and validation examples.

    Writes the data report into ``run_dir`` and checks the token ids fit ``model_dir``'s vocabulary."""
    train_ex, rep = load(d.path, tok, d.max_len)
    reports = [rep]
    if d.val_path:
        val_ex, vrep = load(d.val_path, tok, d.max_len)
        reports.append(vrep)
    else:
        train_ex, val_ex = split_val(train_ex, d.val_fraction, seed)
    report_data(reports, run_dir)
    check_vocab(model_dir, train_ex + val_ex, d.path)
    return train_ex, val_ex


def prepare_for(cfg: Any, model_dir: str) -> Prepared:
    prep = prepare(model_dir, cfg.method, lora=lora_spec(cfg.lora), quant_method=cfg.quant.method,
                   group_size=cfg.quant.group_size, prompt=prompt_spec(cfg.prompt), dtype=cfg.dtype,
                   device=cfg.train.device, tokenizer_dir=cfg.tokenizer, seed=cfg.train.seed,
                   init_adapter=cfg.lora.init_from if cfg.method in ("lora", "qlora") else None)
    console.print(f"[bold]{cfg.method}[/bold] {prep.describe()}")
    return prep


def sft_loss(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
    loss, n, acc = sft_token_loss(model, batch)
    return LossOutput(loss, n, {"token_acc": acc})


def finetune(cfg: FinetuneConfig) -> FitResult:
    from lmstack.export.gguf_import import resolve_model_path

    cfg = cfg.model_copy(update={"model": str(resolve_model_path(cfg.model))})  # a .gguf: imported once, cached
    from lmstack.model.seq2seq import is_seq2seq_dir

    if is_seq2seq_dir(cfg.model):
        from lmstack.errors import ConfigError

        raise ConfigError(f"{cfg.model} is a T5-family encoder-decoder; fine-tune it on input/output pairs with "
                          "`lmstack seq2seq train` (docs/model.md)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model, cfg.tokenizer)
    pad = pad_id_of(tok)
    d = cfg.data
    if d.packing and cfg.method in ("prompt", "prefix"):
        from lmstack.errors import ConfigError

        raise ConfigError("data.packing is not supported with method prompt/prefix (every sequence needs its "
                          "own virtual tokens); set data.packing=false")
    train_ex, val_ex = load_splits(d, tok, cfg.model, cfg.train.seed, run_dir)
    console.print(f"[bold]data[/bold] {len(train_ex)} train / {len(val_ex)} validation examples")

    prep = prepare_for(cfg, cfg.model)
    batches = SFTBatches(train_ex, d.batch_size, pad, seed=cfg.train.seed, packing=d.packing, seq_len=d.max_len,
                         group_by_length=d.group_by_length)
    val = sft_eval_batches(val_ex, d.batch_size, pad) if val_ex else None
    return fit(prep.model, batches, sft_loss, cfg.train, run_dir, val_data=val, save_model_fn=prep.save_fn,
               tokenizer_dir=cfg.tokenizer or cfg.model, run_config=cfg)
