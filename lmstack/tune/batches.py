"""Stateful batch sources for ``lmstack.train.fit`` (``next()``, ``state_dict``, ``load_state_dict``).

* :class:`SFTBatches`: padded (right) batches, or packed rows with per-document positions and a
  block-diagonal causal mask (:class:`DocumentContext`) so packed examples never attend to each other
  (the "packing without cross-contamination" of Krell et al. 2021 / Hugging Face's packing with
  ``position_ids``).
* :class:`PairBatches`: chosen and rejected sequences of preference pairs, with optional reference log-probs.

Batch tensors: ``input_ids`` (B, T), ``labels`` (B, T) with -100 where no loss (labels are *not* shifted:
position t predicts token t+1), ``attention_mask`` (B, T); packing adds ``position_ids`` and ``doc_ids``.
The epoch order is a seeded shuffle; the state is (epoch, cursor), so resume is exact.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from lmstack.model.attention import sdpa
from lmstack.tune.data import Example, PairExample

IGNORE = -100


class DocumentContext:
    """Causal attention restricted to tokens of the same document: doc_ids (B, T), -1 marks padding."""

    def __init__(self, doc_ids: Tensor):
        same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
        T = doc_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=doc_ids.device)
        self.mask = ((same & causal) | eye)[:, None]  # (B, 1, T, T); padding sees itself (no NaN)

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sdpa(q, k, v, self.mask)


def _pad(seqs: Sequence[Sequence[int]], value: int, multiple: int = 8) -> Tensor:
    T = max(len(s) for s in seqs)
    T = -(-T // multiple) * multiple
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate_sft(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    ids = _pad([e.input_ids for e in examples], pad_id)
    mask = _pad([e.loss_mask for e in examples], 0)
    attn = _pad([[1] * len(e.input_ids) for e in examples], 0)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def pack_rows(examples: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, Tensor]:
    """Concatenate examples into rows of ``seq_len`` (an example never spans two rows)."""
    rows: list[list[tuple[int, Example]]] = [[]]
    used = 0
    for j, e in enumerate(examples):
        if used + len(e.input_ids) > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append((j, e))
        used += len(e.input_ids)
    B = len(rows)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    pos = torch.zeros(B, seq_len, dtype=torch.long)
    doc = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for d, (_, e) in enumerate(row):
            n = min(len(e.input_ids), seq_len - t)
            x = torch.tensor(e.input_ids[:n])
            m = torch.tensor(e.loss_mask[:n]).bool()
            ids[b, t:t + n] = x
            labels[b, t:t + n] = torch.where(m, x, torch.full_like(x, IGNORE))
            pos[b, t:t + n] = torch.arange(n)
            doc[b, t:t + n] = d
            t += n
    return {"input_ids": ids, "labels": labels, "attention_mask": (doc >= 0).long(),
            "position_ids": pos, "doc_ids": doc}


MEGA_BATCHES = 50  # group_by_length: batches per run sorted by length (Hugging Face's LengthGroupedSampler)


class _Epochs:
    """Seeded per-epoch shuffles of ``n`` items, consumed ``k`` at a time; state = (epoch, cursor).

    ``lengths`` + ``batch``: group by length -- each run of ``MEGA_BATCHES * batch`` shuffled items is sorted
    by length and cut into batches, whose order is then shuffled within the run, so a batch holds items of
    similar length (little padding) and lengths do not come long-to-short. The order is a function of (seed,
    epoch), so a resumed run continues exactly."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, lengths: Sequence[int] | None = None,
                 batch: int = 0):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.lengths, self.batch = lengths, batch
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.n))
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        if self.lengths is not None and self.batch > 0:
            mega = MEGA_BATCHES * self.batch
            grouped: list[int] = []
            for a in range(0, self.n, mega):
                run = sorted(order[a:a + mega], key=lambda i: -self.lengths[i])
                batches = [run[b:b + self.batch] for b in range(0, len(run), self.batch)]
                if self.shuffle:
                    rng.shuffle(batches)
                grouped += [i for b in batches for i in b]
            order = grouped
        return order

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.cursor >= self.n:
                self.epoch += 1
                self.cursor = 0
                self._order = self._make_order()
            out.append(self._order[self.cursor])
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._make_order()


class SFTBatches:
    """Endless SFT batches: ``batch_size`` examples per batch, or with ``packing`` rows of ``seq_len`` tokens
    filled with about ``batch_size * seq_len`` tokens of examples."""

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, seed: int = 0,
                 packing: bool = False, seq_len: int = 1024, shuffle: bool = True, group_by_length: bool = False):
        self.examples = list(examples)
        self.batch_size, self.pad_id, self.packing, self.seq_len = batch_size, pad_id, packing, seq_len
        grouped = group_by_length and not packing  # (packed rows have no padding to save)
        self.order = _Epochs(len(self.examples), seed, shuffle,
                             lengths=[len(e.input_ids) for e in self.examples] if grouped else None,
                             batch=batch_size if grouped else 0)
        mean_len = sum(len(e.input_ids) for e in self.examples) / max(1, len(self.examples))
        self.per_pack = max(1, int(batch_size * seq_len / max(1.0, mean_len))) if packing else batch_size

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        chosen = [self.examples[i] for i in self.order.take(self.per_pack)]
        if self.packing:
            return pack_rows(chosen, self.seq_len, self.pad_id)
        return collate_sft(chosen, self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


def sft_eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int):
    """A callable returning one ordered pass over ``examples`` (for ``fit(val_data=...)``)."""
    def make() -> Iterator[dict[str, Tensor]]:
        for i in range(0, len(examples), batch_size):
            yield collate_sft(examples[i:i + batch_size], pad_id)
    return make


def collate_pairs(pairs: Sequence[PairExample], pad_id: int) -> dict[str, Tensor]:
    """Chosen rows first, then rejected rows: (2B, T) so one forward pass scores both."""
    ex = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = collate_sft(ex, pad_id)
    if all(p.ref_chosen is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs],
                                          dtype=torch.float64)
    return batch


class PairBatches:
    def __init__(self, pairs: Sequence[PairExample], batch_size: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True):
        self.pairs = list(pairs)
        self.batch_size, self.pad_id = batch_size, pad_id
        self.order = _Epochs(len(self.pairs), seed, shuffle)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        return collate_pairs([self.pairs[i] for i in self.order.take(self.batch_size)], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


def pair_eval_batches(pairs: Sequence[PairExample], batch_size: int, pad_id: int):
    def make() -> Iterator[dict[str, Tensor]]:
        for i in range(0, len(pairs), batch_size):
            yield collate_pairs(pairs[i:i + batch_size], pad_id)
    return make
