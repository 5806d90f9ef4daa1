"""Read and write Hugging Face model directories.

Loading is a key copy: the Transformer is built on the meta device (no memory, no init), tensors are
read from mmap'd safetensors and attached with ``load_state_dict(assign=True)``; an fp32 checkpoint
loaded as fp32 on CPU is never copied. Saving writes the same layout (sharded above ``max_shard_bytes``)
so ``transformers.AutoModelForCausalLM.from_pretrained`` reads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmstack.errors import CheckpointError
from lmstack.model.config import ModelConfig
from lmstack.model.transformer import Transformer
from lmstack.utils.device import resolve_device, resolve_dtype
from lmstack.utils.io import atomic_write_json

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory (single file or sharded index)."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({path / f for f in wm.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    if (path / "pytorch_model.bin").is_file():
        raise CheckpointError(
            f"{path} has only pytorch_model.bin; convert it to safetensors first "
            "(transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory, mmap'd (zero-copy on CPU)."""
    path = Path(path)
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for k in st.keys():
                    sd[k] = st.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file, it may be corrupt or truncated ({e})") from None
    return sd


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a model directory, from the safetensors headers only (no data read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in weight_files(Path(path)):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for k in st.keys():
                    shapes[k] = tuple(st.get_slice(k).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file, it may be corrupt or truncated ({e})") from None
    return shapes


def check_weights(path: str | Path, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> Transformer:
    """The one weights-vs-config check that loading and ``lmstack info`` share: every tensor the config implies
    is present with its shape, and nothing else. Returns the model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = {k for k in shapes if not k.endswith(_IGNORED_KEY_SUFFIXES)}
    if cfg.tie_word_embeddings:
        names.discard("lm_head.weight")
    missing = [k for k in expected if k not in names and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    unexpected = sorted(k for k in names if k not in expected)
    if missing:
        raise CheckpointError(
            f"{path}: weights are missing {len(missing)} tensor(s) the config needs, e.g. {missing[0]} "
            "(do config.json and the weights belong to the same model?)"
        )
    if unexpected:
        raise CheckpointError(
            f"{path}: weights have {len(unexpected)} tensor(s) the config does not describe, e.g. {unexpected[0]}"
            " (a field of config.json lmstack does not read, or weights of another model)"
        )
    for k in names:
        if tuple(shapes[k]) != expected[k]:
            raise CheckpointError(
                f"{path}: tensor {k} has shape {tuple(shapes[k])} but config.json implies {expected[k]}"
            )
    return model


def load_model(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Transformer:
    """Load a local HF directory (any of ``SUPPORTED_MODEL_TYPES``) into lmstack's Transformer, in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: model directory not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a model directory, got a file")
    cfg = ModelConfig.from_hf(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype if dtype is not None else "auto", dev)
    sd = read_state_dict(path)
    model = check_weights(path, cfg, {k: tuple(t.shape) for k, t in sd.items()})
    for k in list(sd):
        if k.endswith(_IGNORED_KEY_SUFFIXES) or (cfg.tie_word_embeddings and k == "lm_head.weight"):
            del sd[k]
    for k, t in sd.items():
        sd[k] = t.to(device=dev, dtype=dt) if t.is_floating_point() else t.to(dev)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, assign=True, strict=True)
    model.tie_weights()
    model.config.torch_dtype = str(dt).removeprefix("torch.")
    return model.eval()


def build_model(cfg: ModelConfig, *, device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None, seed: int = 0) -> Transformer:
    """A freshly initialised model (for pretraining from scratch and tests)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype if dtype is not None else "auto", dev)
    with torch.device(dev):
        model = Transformer(cfg)
    model.init_weights(seed)
    return model.to(dt)


def stop_token_ids(cfg: ModelConfig, tokenizer_dir: str | Path | None) -> int | list[int] | None:
    """Every id that ends a generation: the config's eos plus, from the tokenizer directory, its eos and the
    chat template's end-of-turn markers (``<|im_end|>``, ``<|eot_id|>``, ...) — the ids lmstack's engine stops
    on, so ``transformers``' ``generate`` stops at the end of a turn too (one int when there is one id)."""
    ids: list[int] = []
    for e in (cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]):
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        from lmstack.tokenizer import Tokenizer  # the same rule the engine stops by (Tokenizer.eos_token_ids)

        for e in Tokenizer.from_dir(tokenizer_dir).eos_token_ids:
            if e not in ids:
                ids.append(int(e))
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def generation_config(cfg: ModelConfig, tokenizer_dir: str | Path | None = None) -> dict[str, Any]:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": stop_token_ids(cfg, tokenizer_dir),
            "pad_token_id": cfg.pad_token_id, "do_sample": False}


def save_model(
    model: Transformer,
    path: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    extra_generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` (or shards + index), ``generation_config.json`` and,
    from ``tokenizer_dir``, the tokenizer files. Each file is written atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        tensors[k] = t.detach().to("cpu").contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    for stale in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        _save_safetensors(shards[0], path / "model.safetensors")
    else:
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            _save_safetensors(shard, path / name)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_json(path / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
    hf = cfg.to_hf()
    dt = next(iter(tensors.values())).dtype if tensors else torch.float32
    hf["torch_dtype"] = str(dt).removeprefix("torch.")
    atomic_write_json(path / "config.json", hf)
    gen = generation_config(cfg, tokenizer_dir)
    gen.update(extra_generation_config or {})
    atomic_write_json(path / "generation_config.json", gen)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, path)
    return path


def _save_safetensors(tensors: dict[str, torch.Tensor], dest: Path) -> None:
    """safetensors writes by path, so write to a temp name beside ``dest`` and rename (atomic)."""
    tmp = dest.with_name(f".{dest.name}.partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(dest)


def copy_tokenizer(src: str | Path, dest: str | Path) -> None:
    src, dest = Path(src), Path(dest)
    if src.resolve() == dest.resolve():
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
