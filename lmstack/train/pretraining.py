"""``pretrain(cfg)``: a model (from a preset, or a Hugging Face directory to continue pretraining), token
shards, packed windows, the causal-LM loss, then :func:`lmstack.train.fit`. With ``model.arch: encoder`` the
model is a BERT-style encoder and the loss masked-LM with dynamic 80/10/10 masking (:mod:`lmstack.train.mlm`)
on the same shards; ``final/`` is then a ``BertForMaskedLM`` directory. Reads top to bottom like
nanoGPT's ``train.py``: setup -> checks -> loop -> save.

Everything that can be wrong with the inputs is checked before the first step, each with the fix:
empty shards, shards from another tokenizer than the model's (``tokenizer_sha256``), token ids beyond the
model's vocabulary, ``seq_len`` beyond ``max_position_embeddings``, fewer windows than one global batch,
and a batch whose estimated memory exceeds what the device has free.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError, DataError
from lmstack.train.config import PretrainConfig
from lmstack.train.data import PackedBatches, eval_batches, window_starts
from lmstack.train.loop import FitResult, fit
from lmstack.train.losses import causal_lm_loss


def pretrain(cfg: PretrainConfig) -> FitResult:
    from lmstack.data.shards import open_split, read_index
    from lmstack.model import build_model, load_model, preset

    tc, dc = cfg.train, cfg.data
    shards = Path(dc.shards)
    index = read_index(shards)
    train_arrays = open_split(shards, "train")
    n_train = sum(len(a) for a in train_arrays)
    if n_train == 0:
        raise DataError(f"{shards}: the train split has no tokens; re-run `lmstack data tokenize` on non-empty input")
    val_tokens = index["splits"].get("val", {}).get("tokens", 0)
    val_arrays = open_split(shards, "val") if val_tokens else []

    # ---- model: from scratch (preset) or continued pretraining (HF directory)
    shard_sha = index.get("tokenizer_sha256")
    tokenizer_dir = _tokenizer_dir(index, shards)
    encoder = cfg.model.arch == "encoder"
    if encoder:
        model, tokenizer_dir = _encoder(cfg, index, shards, tokenizer_dir, shard_sha)
    elif cfg.model.from_dir:
        src = Path(cfg.model.from_dir)
        model = load_model(src, device="cpu", dtype="fp32").train()
        model_sha = _sha(src / "tokenizer.json")
        if model_sha and shard_sha and model_sha != shard_sha:
            raise DataError(
                f"{shards}/index.json: tokenizer_sha256 {shard_sha[:12]}... differs from {src}/tokenizer.json "
                f"({model_sha[:12]}...); tokenize the data with the model's tokenizer "
                f"(lmstack data tokenize --tokenizer {src})")
        if model_sha:
            tokenizer_dir = src
    else:
        over: dict[str, Any] = dict(cfg.model.overrides)
        over.setdefault("vocab_size", int(index["vocab_size"]))
        over.setdefault("eos_token_id", index.get("eos_token_id"))
        mc = preset(cfg.model.preset or "tiny", **over)
        model = build_model(mc, device="cpu", dtype="fp32", seed=tc.seed).train()
    if tokenizer_dir is None and (index.get("tokenizer_dir") or shard_sha):
        # the run's final/ would be a model directory no one can load (no tokenizer): refuse before training
        raise DataError(f"{shards}/index.json: the tokenizer the shards were made with "
                        f"({index.get('tokenizer_dir') or 'sha ' + str(shard_sha)[:12]}) is not found from here; "
                        "restore it next to the shards, or re-run `lmstack data tokenize`")
    mc = model.config

    # ---- checks before any work
    if dc.seq_len > mc.max_position_embeddings:
        raise ConfigError(f"data.seq_len={dc.seq_len} exceeds the model's max_position_embeddings "
                          f"({mc.max_position_embeddings}); lower data.seq_len")
    if int(index["vocab_size"]) > mc.vocab_size:
        raise DataError(f"{shards}/index.json: vocab_size {index['vocab_size']} > the model's vocab_size "
                        f"{mc.vocab_size}; token ids would index past the embedding")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if not encoder:  # (the estimate is the decoder's; an encoder of the same size needs less: no big logits)
        check_memory(mc, dc.batch_size, dc.seq_len, tc.activation_checkpointing, tc.device, world,
                     fsdp=tc.distributed == "fsdp" or tc.tp_size > 1)
    elif tc.tp_size > 1:
        raise ConfigError("train.tp_size > 1 is for the decoder; the encoder trains with ddp")
    if tc.tp_size > 1:  # the tp ranks of one replica read the same batches: data parallel over the replicas
        from lmstack.train.tensor_parallel import check_tp

        check_tp(mc, tc.tp_size)
        world, rank = max(world // tc.tp_size, 1), rank // tc.tp_size
    files, offs = window_starts(train_arrays, dc.seq_len)
    val_windows = None
    if not val_arrays:  # hold out the last windows of train
        k = min(dc.val_windows, len(files) // 10)
        if k:
            val_windows = (files[-k:], offs[-k:])
            files, offs = files[:-k], offs[:-k]
        val_arrays = train_arrays if k else []
    need = dc.batch_size * world
    if len(files) < need:
        raise DataError(f"{shards}: the train split has {len(files)} windows of {dc.seq_len + 1} tokens "
                        f"({n_train} tokens) but one step needs {need} (data.batch_size x processes); "
                        "add data, or lower data.seq_len / data.batch_size")
    if dc.replay and dc.replay_share > 0:
        train = _replay_batches(cfg, shards, index, (train_arrays, files, offs), rank, world)
    else:
        train = PackedBatches(train_arrays, dc.seq_len, dc.batch_size, seed=tc.seed, rank=rank, world_size=world,
                              windows=(files, offs))

    def val_pass() -> Any:
        return eval_batches(val_arrays, dc.seq_len, dc.batch_size, rank=rank, world_size=world, windows=val_windows)

    val = val_pass if val_arrays else None

    if encoder:
        from lmstack.train.mlm import MaskingBatches, encoder_saver, masked_lm_loss

        mask_id, special = _mask_token(cfg, tokenizer_dir, index)
        masked = MaskingBatches(train, seed=tc.seed + rank)  # the masking RNG is checkpointed with the data
        loss = masked_lm_loss(mask_id, mc.vocab_size, special, cfg.model.mlm_probability, generator=masked.generator)
        return fit(model, masked, loss, tc, cfg.run_dir, val_data=val, run_config=cfg,
                   save_model_fn=encoder_saver(tokenizer_dir))
    return fit(model, train, causal_lm_loss, tc, cfg.run_dir, val_data=val,
               tokenizer_dir=tokenizer_dir, run_config=cfg)


# ----------------------------------------------------------------------------------------------- helpers
def _replay_batches(cfg: PretrainConfig, shards: Path, index: dict[str, Any], domain: tuple, rank: int, world: int):
    """Domain windows mixed with ``data.replay_share`` of general windows from ``data.replay`` (same tokenizer)."""
    from lmstack.data.shards import open_split, read_index
    from lmstack.train.data import ReplayBatches

    dc, tc = cfg.data, cfg.train
    rdir = Path(dc.replay)
    rindex = read_index(rdir)
    if rindex.get("tokenizer_sha256") != index.get("tokenizer_sha256"):
        raise DataError(f"{rdir}/index.json: data.replay was tokenized with another tokenizer than {shards}; "
                        "tokenize both with the model's tokenizer")
    rarrays = open_split(rdir, "train")
    rwin = window_starts(rarrays, dc.seq_len)
    if len(rwin[0]) == 0:
        raise DataError(f"{rdir}: the replay train split has no window of {dc.seq_len + 1} tokens")
    arrays, files, offs = domain
    return ReplayBatches(PackedBatches(arrays, dc.seq_len, 1, seed=tc.seed, windows=(files, offs)),
                         PackedBatches(rarrays, dc.seq_len, 1, seed=tc.seed + 1, windows=rwin),
                         dc.replay_share, dc.batch_size, rank=rank, world_size=world)


def _encoder(cfg: PretrainConfig, index: dict[str, Any], shards: Path, tokenizer_dir: Path | None,
             shard_sha: str | None):
    """The BERT-style encoder with its masked-LM head: a named shape (bert-* or modernbert-*), or a BERT /
    ModernBERT directory (continued MLM)."""
    from lmstack.model.encoder import encoder_preset, load_encoder

    if cfg.model.from_dir:
        src = Path(cfg.model.from_dir)
        model = load_encoder(src).train()
        if model.config.head != "mlm":
            raise ConfigError(f"{src}: a {model.config.head!r} encoder has no masked-LM head; continue MLM "
                              "pretraining from a BertForMaskedLM directory (or start from a preset)")
        model_sha = _sha(src / "tokenizer.json")
        if model_sha and shard_sha and model_sha != shard_sha:
            raise DataError(f"{shards}/index.json: tokenizer_sha256 differs from {src}/tokenizer.json; tokenize "
                            f"the data with the model's tokenizer (lmstack data tokenize --tokenizer {src})")
        return model, (src if model_sha else tokenizer_dir)
    from lmstack.model.encoder import Encoder

    over: dict[str, Any] = dict(cfg.model.overrides)
    vocab = int(index["vocab_size"])
    if tokenizer_dir is not None:
        from tokenizers import Tokenizer

        vocab = max(vocab, Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size())
    over.setdefault("vocab_size", vocab)
    over["head"] = "mlm"
    name = cfg.model.preset or "bert-tiny"
    if name.startswith("modernbert"):  # ModernBERT: RoPE, GeGLU, global / local layers (lmstack.model.modernbert)
        from lmstack.model.modernbert import ModernBert, modernbert_preset

        over.setdefault("max_position_embeddings", max(512, cfg.data.seq_len))
        return ModernBert(modernbert_preset(name, **over)).init_weights(cfg.train.seed).train(), tokenizer_dir
    return Encoder(encoder_preset(name, **over)).init_weights(cfg.train.seed).train(), tokenizer_dir


def _mask_token(cfg: PretrainConfig, tokenizer_dir: Path | None, index: dict[str, Any]) -> tuple[int, set[int]]:
    """The mask token's id and the ids never selected for masking (the tokenizer's special tokens, EOS)."""
    import json

    if tokenizer_dir is None:
        raise DataError("MLM pretraining needs the shards' tokenizer (to find the mask token); it is not found")
    path = tokenizer_dir / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    added = {t["content"]: int(t["id"]) for t in tj.get("added_tokens", [])}
    vocab = (tj.get("model") or {}).get("vocab") or {}
    lookup = dict(vocab) if isinstance(vocab, dict) else {}
    lookup.update(added)
    names = [cfg.model.mask_token] if cfg.model.mask_token else ["[MASK]", "<mask>"]
    for n in names:
        if n in lookup:
            mask_id = int(lookup[n])
            break
    else:
        raise DataError(f"{path}: no mask token ({' / '.join(names)}); train the tokenizer with it as a special "
                        "token, or name the tokenizer's mask token with model.mask_token")
    special = {int(t["id"]) for t in tj.get("added_tokens", []) if t.get("special")} | {mask_id}
    if index.get("eos_token_id") is not None:
        special.add(int(index["eos_token_id"]))
    return mask_id, special


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _tokenizer_dir(index: dict[str, Any], shards: Path) -> Path | None:
    """The shards' tokenizer directory, if it still exists and is the one the shards were made with."""
    d = index.get("tokenizer_dir")
    if not d:
        return None
    p = Path(d) if Path(d).is_absolute() else (shards / d if (shards / d).exists() else Path(d))
    sha = _sha(p / "tokenizer.json")
    if sha is None:
        return None
    if index.get("tokenizer_sha256") and sha != index["tokenizer_sha256"]:
        raise DataError(f"{shards}/index.json: tokenizer_sha256 does not match {p}/tokenizer.json (the tokenizer "
                        "changed after tokenizing); re-run `lmstack data tokenize`")
    return p


def estimate_memory(mc, batch_size: int, seq_len: int, activation_checkpointing: bool,
                    world_size: int = 1, fsdp: bool = False) -> int:
    """Rough training bytes per process in fp32: weights + grads + AdamW (16 B/param, /world under FSDP)
    plus saved activations (per token per layer ~ 14 h + 5 i floats; 1 h with checkpointing, plus one
    recomputed block) plus logits (3 copies of B x T x V: logits, fp32 loss input, their gradient)."""
    params = mc.num_parameters()
    state = 16 * params // (world_size if fsdp else 1)
    tokens = batch_size * seq_len
    per_layer = 4 * tokens * (14 * mc.hidden_size + 5 * mc.intermediate_size)
    if activation_checkpointing:
        acts = 4 * tokens * mc.hidden_size * mc.num_hidden_layers + per_layer
    else:
        acts = per_layer * mc.num_hidden_layers
    logits = 3 * 4 * tokens * mc.vocab_size
    return int(state + acts + logits)


def available_memory(device: str) -> int | None:
    """Free bytes on the training device (CUDA: mem_get_info; CPU: MemAvailable), None if unknown."""
    import torch

    from lmstack.utils.device import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(mc, batch_size: int, seq_len: int, ac: bool, device: str, world_size: int = 1,
                 fsdp: bool = False) -> None:
    need = estimate_memory(mc, batch_size, seq_len, ac, world_size, fsdp)
    free = available_memory(device)
    if free is not None and need > free:
        gib = 1024**3
        hint = "" if ac else ", set train.activation_checkpointing=true"
        raise ConfigError(
            f"data.batch_size={batch_size} x data.seq_len={seq_len} needs about {need / gib:.1f} GiB to train "
            f"but {free / gib:.1f} GiB is free; lower data.batch_size and raise train.grad_accum{hint}")


__all__ = ["pretrain", "estimate_memory", "check_memory"]
