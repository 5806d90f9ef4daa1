"""Losses of the fine-tuning methods, as plain tensor functions.

* SFT: token cross-entropy on the assistant tokens (labels -100 elsewhere), mean over those tokens.
* DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7):
  ``L = -log σ(β[(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])``;
  with label smoothing ε (conservative DPO, Mitchell 2023): ``(1-ε)·L(h) + ε·L(-h)``;
  IPO (Azar et al. 2023): ``(h/β - 1/(2β))²`` on the same log-ratio difference ``h/β``.
* Knowledge distillation (Hinton et al. 2015): ``α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-α)·CE(s, y)``,
  per target token, mean over target tokens.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmstack.tune.batches import IGNORE, DocumentContext

CHUNK_ELEMENTS = 1 << 26  # logits materialised at once by the chunked loss: 64M floats = 256 MiB in fp32


def forward_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Logits (B, T, V) for an SFT/pair batch; packed batches use per-document positions and masks."""
    if "doc_ids" in batch:
        return model(batch["input_ids"], position_ids=batch["position_ids"], ctx=DocumentContext(batch["doc_ids"]))
    mask = batch.get("attention_mask")
    if mask is not None and bool(mask.all()):
        mask = None  # no padding: the causal fast path (flash / is_causal SDPA) instead of an explicit mask
    return model(batch["input_ids"], attention_mask=mask)


def _core_model(model: nn.Module) -> nn.Module:
    """The lmstack Transformer inside DDP / torch.compile / prompt-tuning wrappers."""
    m = getattr(model, "module", model)
    m = getattr(m, "_orig_mod", m)
    return getattr(m, "base", m)


@contextlib.contextmanager
def hidden_only(model: nn.Module) -> Iterator[nn.Linear | None]:
    """Within the block, ``model(...)`` returns final hidden states (B, T, hidden) instead of logits; yields
    the real ``lm_head`` (None, and nothing swapped, when it is not a plain replicated ``nn.Linear``, e.g. an
    FSDP2-sharded one). The call still goes through the wrappers, so DDP sees a normal forward."""
    core = _core_model(model)
    head = getattr(core, "lm_head", None)
    if type(head) is not nn.Linear or head.bias is not None or hasattr(head.weight, "full_tensor"):
        yield None
        return
    core.lm_head = nn.Identity()
    try:
        yield head
    finally:
        core.lm_head = head


def _ce_chunk(h: Tensor, w: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    logits = F.linear(h, w).float()  # (n, V)
    return F.cross_entropy(logits, t, reduction="sum"), (logits.argmax(-1) == t).sum()


def chunked_ce(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    """Summed CE of ``hidden`` (N, H) @ ``weight``.T (V, H) against ``targets`` (N,), a few rows at a time;
    each chunk's logits are recomputed in backward (activation checkpointing), so at most ``CHUNK_ELEMENTS``
    logits exist at once. Returns (loss sum, number of correct argmax predictions)."""
    n = hidden.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = 0
    for i in range(0, n, chunk):
        if chunk >= n:  # one chunk: nothing to save by recomputing
            loss, c = _ce_chunk(hidden, weight, targets)
        else:
            loss, c = checkpoint(_ce_chunk, hidden[i:i + chunk], weight, targets[i:i + chunk], use_reentrant=False)
        total = total + loss
        correct += int(c)
    return total, correct


def sft_token_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int, float]:
    """(mean CE over target tokens, target tokens, token accuracy), computing logits only for the target
    positions and only a chunk at a time (large vocabularies: a 152k-entry vocabulary makes the full fp32
    logits of a 8 x 1024 batch 5 GB). Equal to ``token_ce(forward_logits(model, batch), labels)``."""
    labels = batch["labels"]
    with hidden_only(model) as head:
        out = forward_logits(model, batch)
    if head is None:
        return token_ce(out, labels)
    tg = labels[:, 1:]  # (B, T-1)
    valid = tg != IGNORE
    n = int(valid.sum())
    h = out[:, :-1][valid]  # (N, hidden): only positions that predict a target
    if n == 0:
        return out.sum() * 0.0, 0, 0.0
    loss, correct = chunked_ce(h, head.weight, tg[valid])
    return loss / n, n, correct / n


def _logp_chunk(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
    logits = F.linear(h, w).float()  # (n, V)
    return logits.gather(-1, t[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)  # (n,)


def chunked_target_logps(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """log p(target) (N,) for ``hidden`` (N, H), with the chunking of :func:`chunked_ce`."""
    n = hidden.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if chunk >= n:
        return _logp_chunk(hidden, weight, targets)
    return torch.cat([checkpoint(_logp_chunk, hidden[i:i + chunk], weight, targets[i:i + chunk],
                                 use_reentrant=False) for i in range(0, n, chunk)])


def model_sequence_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Summed log p(target) per row (B,) of ``batch`` under ``model``; equal to
    ``sequence_logps(forward_logits(model, batch), labels)`` without materialising the full logits."""
    labels = batch["labels"]
    with hidden_only(model) as head:
        out = forward_logits(model, batch)
    if head is None:
        return sequence_logps(out, labels)
    tg = labels[:, 1:]
    valid = tg != IGNORE  # (B, T-1)
    lp = chunked_target_logps(out[:, :-1][valid], head.weight, tg[valid])  # (N,)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(valid)[valid]  # (N,)
    return torch.zeros(labels.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


def shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Position t predicts token t+1: logits (B, T-1, V), targets (B, T-1)."""
    return logits[:, :-1], labels[:, 1:]


def token_ce(logits: Tensor, labels: Tensor) -> tuple[Tensor, int, float]:
    """(mean CE over target tokens, number of target tokens, token accuracy)."""
    lg, tg = shifted(logits, labels)
    n = int((tg != IGNORE).sum())
    loss = F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=IGNORE,
                           reduction="sum") / max(n, 1)
    with torch.no_grad():
        valid = tg != IGNORE
        acc = float(((lg.argmax(-1) == tg) & valid).sum()) / max(n, 1)
    return loss, n, acc


def sequence_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of log p(target) over each row's target tokens: (B,)."""
    lg, tg = shifted(logits, labels)
    valid = tg != IGNORE
    logp = torch.log_softmax(lg.float(), dim=-1)
    tok = logp.gather(-1, tg.clamp_min(0)[..., None])[..., 0]  # (B, T-1)
    return (tok * valid).sum(-1)


def dpo_loss(pol_chosen: Tensor, pol_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid"
             ) -> tuple[Tensor, dict[str, float]]:
    """Mean DPO loss over pairs (each argument (B,) summed log-probs) and the usual metrics."""
    chosen_ratio = pol_chosen - ref_chosen  # (B,)
    rejected_ratio = pol_rejected - ref_rejected
    logits = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo loss_type {loss_type!r}; supported: sigmoid, ipo")
    with torch.no_grad():
        rc, rr = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        metrics = {
            "rewards_chosen": float(rc.mean()), "rewards_rejected": float(rr.mean()),
            "reward_margin": float((rc - rr).mean()), "pref_accuracy": float((rc > rr).float().mean()),
        }
    return losses.mean(), metrics


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 2.0,
            alpha: float = 0.5) -> tuple[Tensor, int, dict[str, float]]:
    """Hinton distillation on target tokens: (mean loss, target tokens, {"kd", "ce"})."""
    s, tg = shifted(student_logits, labels)
    t, _ = shifted(teacher_logits, labels)
    valid = tg != IGNORE  # (B, T-1)
    n = int(valid.sum())
    s_v, t_v = s[valid].float(), t[valid].float()  # (N, V)
    log_ps = torch.log_softmax(s_v / temperature, dim=-1)
    log_pt = torch.log_softmax(t_v / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (N,) KL(teacher || student)
    ce = F.cross_entropy(s_v, tg[valid], reduction="none")  # (N,)
    per_tok = alpha * temperature ** 2 * kl + (1 - alpha) * ce
    loss = per_tok.sum() / max(n, 1)
    return loss, n, {"kd": float(kl.detach().mean()) if n else 0.0, "ce": float(ce.detach().mean()) if n else 0.0}
