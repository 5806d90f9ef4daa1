"""Masked-LM pretraining of the BERT-style encoder through the one loop (:func:`lmstack.train.fit`) on the same
token shards as decoder pretraining (:class:`lmstack.train.data.PackedBatches`).

``masked_lm_loss`` builds the ``(model, batch) -> LossOutput`` that ``fit`` takes: each batch's ``input_ids``
are masked afresh (dynamic masking, BERT's 80/10/10 rule, :func:`lmstack.model.encoder.mlm_inputs`) and the loss is
the cross-entropy on the selected positions (Devlin et al. 2019). ``save_encoder_fn`` writes checkpoints and
``final/`` as a ``BertForMaskedLM`` (or ``ModernBertForMaskedLM``) directory. :class:`MaskingBatches` keeps the masking generator with the data
position in the checkpoint, so a resumed run masks as an uninterrupted one (``lmstack pretrain`` uses it; a bare
``masked_lm_loss`` with its own generator masks differently after a resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.model.encoder import IGNORE_INDEX, Encoder, mlm_inputs, save_encoder
from lmstack.train.loop import LossOutput


def masked_lm_loss(mask_token_id: int, vocab_size: int, special_ids: set[int] | None = None,
                   mlm_probability: float = 0.15, seed: int = 0, generator: torch.Generator | None = None,
                   ) -> Callable[[nn.Module, dict[str, Tensor]], LossOutput]:
    """``generator``: the masking RNG (e.g. :attr:`MaskingBatches.generator`, checkpointed with the data);
    default a fresh one seeded with ``seed``."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        ids = batch["input_ids"]  # (B, T); PackedBatches' "targets" are ignored (the labels are the masked ids)
        mask = batch.get("attention_mask")
        inputs, labels = mlm_inputs(ids.cpu(), mask_token_id=mask_token_id, vocab_size=vocab_size,
                                    special_ids=special_ids, mlm_probability=mlm_probability,
                                    attention_mask=mask.cpu() if mask is not None else None, generator=gen)
        inputs, labels = inputs.to(ids.device), labels.to(ids.device)
        logits = model(inputs, mask)  # (B, T, V)
        n = int((labels != IGNORE_INDEX).sum())
        if n == 0:
            return LossOutput(logits.sum() * 0.0, 0, {})
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return LossOutput(loss, n, {})

    return loss_fn


class MaskingBatches:
    """A batch source plus the masking generator, checkpointed together (``state_dict``), so a resumed MLM run
    masks exactly as an uninterrupted one. Pass :attr:`generator` to :func:`masked_lm_loss`."""

    def __init__(self, batches, seed: int = 0):
        self.batches = batches
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.batches)

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "mask_rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])
        self.generator.set_state(state["mask_rng"])


def save_encoder_fn(model: nn.Module, out_dir: str | Path) -> None:
    """``fit``'s ``save_model_fn`` for an :class:`Encoder` or a ModernBERT (unwraps DDP)."""
    m = getattr(model, "module", model)
    assert isinstance(m, Encoder) or type(m).__name__ == "ModernBert"
    save_encoder(m, out_dir)


def encoder_saver(tokenizer_dir: str | Path | None) -> Callable[[nn.Module, Path], None]:
    """A ``save_model_fn`` that also copies the tokenizer files into each saved directory."""

    def save(model: nn.Module, out_dir: Path) -> None:
        m = getattr(model, "module", model)
        assert isinstance(m, Encoder) or type(m).__name__ == "ModernBert"
        save_encoder(m, out_dir, tokenizer_dir=tokenizer_dir)

    return save
