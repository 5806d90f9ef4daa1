"""Causal language-modelling loss in the :class:`~lmstack.train.loop.LossOutput` shape ``fit`` expects.

Next-token cross-entropy (Bengio et al. 2003; the GPT objective): mean over the predicted tokens whose
target is not ``ignore_index`` (-100, the transformers convention).
Batches carry either ``targets`` (B, T) already aligned with ``input_ids`` (token t predicts targets[t];
what :class:`lmstack.train.data.PackedBatches` yields) or transformers-style ``labels`` (B, T) that equal
the inputs and are shifted here. An optional ``attention_mask`` (B, T) is passed to the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.model.moe import router_losses
from lmstack.train.loop import LossOutput

IGNORE_INDEX = -100


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
    input_ids = batch["input_ids"]  # (B, T)
    mask = batch.get("attention_mask")
    logits = model(input_ids, attention_mask=mask) if mask is not None else model(input_ids)  # (B, T, V)
    if "targets" in batch:
        targets = batch["targets"]  # (B, T)
    else:
        labels = batch["labels"]  # (B, T), unshifted
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    n = int((targets != IGNORE_INDEX).sum())
    if n == 0:  # nothing to predict: a zero loss that still touches the graph (DDP needs a backward)
        z = logits.sum() * 0.0
        return LossOutput(z.to_local() if hasattr(z, "to_local") else z, 0, {})
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
    if hasattr(loss, "to_local"):  # tensor parallel: vocab-sharded logits under loss_parallel give a replicated DTensor
        loss = loss.to_local()
    moe = router_losses(model, mask)  # MoE: weighted load-balancing + z-loss (lmstack.model.moe); {} if dense
    if moe:
        return LossOutput(loss + moe["aux"], n, {"lm_loss": loss.item(), "moe_z_loss": moe["z"].item(),
                                                 "moe_load_balancing": moe["load_balancing"].item()})
    return LossOutput(loss, n, {})
