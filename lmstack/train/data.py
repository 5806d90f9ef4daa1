"""Packed fixed-length windows over token shards, in a seeded order, resumable to the exact window.

The split's shard files (``np.memmap``, see :mod:`lmstack.data.shards`) are cut into non-overlapping windows
of ``seq_len + 1`` tokens starting every ``seq_len`` tokens (GPT-2 / nanoGPT packing: documents are joined
with EOS and attention runs across the boundary). Each window gives ``input_ids = w[:-1]`` and
``targets = w[1:]`` (B, T). An epoch is a permutation of all windows drawn from ``seed + epoch``.

Position is counted in *global* windows: a step under ``world_size`` processes takes the next
``batch_size * world_size`` windows of the permutation and process ``rank`` keeps its ``batch_size``
slice, so one process with batch ``2b`` sees exactly the windows that two processes with batch ``b`` see
together. ``state_dict()`` is ``{epoch, cursor}`` plus shape checks; resuming restores the stream exactly,
even with a different number of processes.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from lmstack.errors import CheckpointError


def window_starts(arrays: Sequence[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(file index, start offset) of every full window of ``seq_len + 1`` tokens, in file order."""
    files, offs = [], []
    for i, a in enumerate(arrays):
        n = (len(a) - 1) // seq_len if len(a) > seq_len else 0
        files.append(np.full(n, i, dtype=np.int64))
        offs.append(np.arange(n, dtype=np.int64) * seq_len)
    if not files:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(files), np.concatenate(offs)


class PackedBatches:
    """A stateful, infinite batch source (``next()`` -> ``{"input_ids", "targets"}``) for :func:`fit`."""

    def __init__(self, arrays: Sequence[np.ndarray], seq_len: int, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 windows: tuple[np.ndarray, np.ndarray] | None = None):
        self.arrays = list(arrays)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.files, self.offsets = windows if windows is not None else window_starts(self.arrays, seq_len)
        self.n = len(self.files)
        self.epoch, self.cursor = 0, 0
        self._perm_epoch, self._perm = -1, np.zeros(0, np.int64)

    def __len__(self) -> int:
        """Windows per epoch."""
        return self.n

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def _window(self, w: int) -> np.ndarray:
        a, o = self.arrays[self.files[w]], self.offsets[w]
        return np.asarray(a[o:o + self.seq_len + 1], dtype=np.int64)  # (T + 1,)

    def __next__(self) -> dict[str, Tensor]:
        if self.n == 0:
            raise StopIteration
        rows = []
        first = self.cursor + self.rank * self.batch_size
        for j in range(self.batch_size):
            g = first + j
            epoch, i = self.epoch + g // self.n, g % self.n
            rows.append(self._window(int(self._order(epoch)[i])))
        self.cursor += self.batch_size * self.world_size
        self.epoch += self.cursor // self.n
        self.cursor %= self.n
        x = torch.from_numpy(np.stack(rows))  # (B, T + 1)
        return {"input_ids": x[:, :-1], "targets": x[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seq_len", "num_windows", "seed"):
            if state.get(k) != getattr(self, "n" if k == "num_windows" else k):
                raise CheckpointError(
                    f"checkpoint data position was saved with {k}={state.get(k)} but this run has "
                    f"{getattr(self, 'n' if k == 'num_windows' else k)}; resume with the same shards, "
                    "data.seq_len and train.seed")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def eval_batches(arrays: Sequence[np.ndarray], seq_len: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, windows: tuple[np.ndarray, np.ndarray] | None = None,
                 ) -> Iterator[dict[str, Tensor]]:
    """One pass over the windows in order; process ``rank`` takes every ``world_size``-th batch slice."""
    src = PackedBatches(arrays, seq_len, batch_size, rank=rank, world_size=world_size, shuffle=False,
                        windows=windows)
    full_steps = src.n // (batch_size * world_size)
    for _ in range(full_steps):
        yield next(src)


def replay_count(step: int, rows: int, share: float) -> int:
    """Replay rows in global batch ``step`` of ``rows`` rows: floor((step+1)·rows·share) - floor(step·rows·share),
    so every prefix of the run holds the configured share to within one row."""
    return int(np.floor((step + 1) * rows * share + 1e-9)) - int(np.floor(step * rows * share + 1e-9))


class ReplayBatches:
    """Continued pretraining with replay: each global batch mixes windows of the domain stream and the replay
    (general) stream, ``share`` of the rows from replay (:func:`replay_count`; replay rows first), the rest from
    the domain. Both streams are :class:`PackedBatches` of single windows with their own seeded order; every
    process draws the whole global batch and keeps its ``batch_size`` slice, so the mix does not depend on the
    number of processes. ``state_dict()`` restores both streams and the step exactly."""

    def __init__(self, domain: PackedBatches, replay: PackedBatches, share: float, batch_size: int, *,
                 rank: int = 0, world_size: int = 1):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"replay share {share} outside [0, 1]")
        for src in (domain, replay):
            if src.batch_size != 1 or src.world_size != 1:
                raise ValueError("ReplayBatches takes single-window streams (batch_size=1, world_size=1)")
        self.domain, self.replay, self.share = domain, replay, share
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.step = 0
        self.last_replay_rows = 0  # replay rows in the last global batch (for tests and logs)

    def __len__(self) -> int:
        return len(self.domain)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        rows = self.batch_size * self.world_size
        k = replay_count(self.step, rows, self.share)
        windows = [self._one(self.replay) for _ in range(k)] + [self._one(self.domain) for _ in range(rows - k)]
        self.step += 1
        self.last_replay_rows = k
        x = torch.stack(windows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])  # (B, T + 1)
        return {"input_ids": x[:, :-1], "targets": x[:, 1:], "is_replay": torch.tensor(
            [r < k for r in range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)])}

    @staticmethod
    def _one(src: PackedBatches) -> Tensor:
        b = next(src)
        return torch.cat([b["input_ids"][0], b["targets"][0, -1:]])  # (T + 1,)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "share": self.share, "domain": self.domain.state_dict(),
                "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("share") != self.share:
            raise CheckpointError(f"checkpoint was saved with data.replay_share={state.get('share')} but this run "
                                  f"has {self.share}; resume with the same share")
        self.domain.load_state_dict(state["domain"])
        self.replay.load_state_dict(state["replay"])
        self.step = int(state["step"])
