"""Which modules a PEFT LoRA ``adapter_config.json`` adapts, with which rank and alpha -- PEFT's own rules.

Reference: ``peft`` (v0.13-0.21) ``tuners_utils.check_target_module_exists`` and ``utils.other.get_pattern_key``:

- ``target_modules`` a **string**: a regular expression that must ``re.fullmatch`` the full module name
  (``"all-linear"``: every linear of the decoder, not ``lm_head``); a **list**: a name matches when it equals an
  entry or ends with ``"." + entry``;
- ``layers_to_transform`` (int or list) with optional ``layers_pattern``: only list-matched modules whose first
  numbered segment (``...layers.<i>.``, or ``<pattern>.<i>.``) is one of those layers;
- ``exclude_modules``: a regex (fullmatch) or a list (equal / ends with), removed from the targets;
- ``rank_pattern`` / ``alpha_pattern``: ``{pattern: value}``; a module takes the value of the first pattern
  ``p`` with ``re.match(rf"(.*\\.)?({p})$", name)``, else ``r`` / ``lora_alpha``.

What lmstack cannot apply is refused with its reason (never a shape error blamed on the base model): DoRA,
LoRA biases, ``modules_to_save``, embedding targets, ``layer_replication``, ``target_parameters``,
``trainable_token_indices``, non-linear targets.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from lmstack.errors import CheckpointError
from lmstack.quant.linear import QuantLinear


def _unsupported(cfg: dict[str, Any]) -> str | None:
    if cfg.get("use_dora"):
        return "DoRA (use_dora: true) is not supported; merge it with peft (merge_and_unload) and load the merged model"
    if cfg.get("bias", "none") != "none":
        return f"LoRA biases (bias: {cfg.get('bias')!r}) are not supported; only bias: none"
    if cfg.get("modules_to_save"):
        return (f"modules_to_save ({cfg['modules_to_save']}) is not supported; merge the adapter with peft and "
                "load the merged model")
    for key in ("layer_replication", "target_parameters", "trainable_token_indices"):
        if cfg.get(key):
            return f"{key} is not supported"
    if cfg.get("fan_in_fan_out"):
        return "fan_in_fan_out: true (Conv1D bases such as GPT-2) is not supported"
    return None


def _matches_list(name: str, entries: list[str]) -> bool:
    return name in entries or any(name.endswith("." + e) for e in entries)


def _layer_index(name: str, layers_pattern: Any) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for p in [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern):
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", name):
            return patterns[p]
    return default


def lora_targets(model: nn.Module, cfg: dict[str, Any], where: Path) -> dict[str, tuple[int, float]]:
    """``{module name: (r, alpha)}`` for a PEFT LoRA config, or :class:`CheckpointError` with the reason."""
    why = _unsupported(cfg)
    if why:
        raise CheckpointError(f"{where}: {why}")
    modules = dict(model.named_modules())
    names = [n for n in modules if n and ".lora_" not in n and ".base_layer" not in n]
    targets = cfg.get("target_modules")
    if targets is None:
        raise CheckpointError(f"{where}: target_modules is missing; name the adapted modules (peft would infer "
                              "them from the model type; lmstack does not)")
    if targets == "all-linear" or targets == ["all-linear"]:
        chosen = [n for n in names if isinstance(modules[n], (nn.Linear, QuantLinear)) and n != "lm_head"]
    elif isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise CheckpointError(f"{where}: target_modules {targets!r} is not a valid regular expression ({e})") from None
        chosen = [n for n in names if rx.fullmatch(n)]
    else:
        targets = list(targets)
        chosen = [n for n in names if _matches_list(n, targets)]
        layers = cfg.get("layers_to_transform")
        if layers is not None and (not isinstance(layers, list) or layers):
            keep = {layers} if isinstance(layers, int) else set(layers)
            chosen = [n for n in chosen if _layer_index(n, cfg.get("layers_pattern")) in keep]
    excl = cfg.get("exclude_modules")
    if excl:
        chosen = [n for n in chosen
                  if not (re.fullmatch(excl, n) if isinstance(excl, str) else _matches_list(n, list(excl)))]
    if not chosen:
        raise CheckpointError(f"{where}: target_modules {targets!r} matches no module of this model")
    for n in chosen:
        m = modules[n]
        if isinstance(m, nn.Embedding):
            raise CheckpointError(f"{where}: targets the embedding {n}; LoRA on embeddings is not supported "
                                  "(merge it with peft and load the merged model)")
        if not isinstance(m, (nn.Linear, QuantLinear)):
            raise CheckpointError(f"{where}: targets {n}, a {type(m).__name__}; only linear layers are supported")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    return {n: (int(_pattern_value(rp, n, r)), float(_pattern_value(ap, n, alpha))) for n in chosen}
