"""A learned linear ranker over answer candidates: ``score = sum_f w_f * x_f``, fit listwise.

Extractive question answering over retrieved passages (the support assistant's default) has to choose one
of a handful of candidate answers per question, from signals of different kinds and scales: the language
model's likelihood of the candidate as the reply, how much of the question the candidate repeats, a sentence
embedding's similarity, the retrieval rank of the passage it came from. How much each signal is worth is a
question for data, not for hand-set constants, so the weights are fit on questions with known answers that
are *not* the questions reported (a dev split), the way learning-to-rank systems combine features:

    loss = mean over questions of  -log( sum_{gold g} exp(s_g) / sum_{candidate c} exp(s_c) )  +  l2 * |w|^2

(optionally a weighted mean: ``group_weights``)

(the listwise softmax loss of ListNet with a one-hot target, Cao et al. 2007; several gold candidates share the
probability mass). It is convex in ``w``; L-BFGS solves it in well under a second for hundreds of questions.
A feature absent from a candidate counts as 0; features constant within every question (such as a dense
similarity for a language the embedder does not read) get no gradient and stay at 0 weight.

    r = LinearRanker.fit(groups, features=["lm", "overlap"])      # groups: [([{feature: x}, ...], [gold idx])]
    r.order([{"lm": -1.2, "overlap": 0.5}, ...]);  r.save("ranker.json");  LinearRanker.load("ranker.json")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from lmstack.errors import DataError

FORMAT = 1


class LinearRanker:
    def __init__(self, weights: Mapping[str, float], info: Mapping[str, Any] | None = None):
        self.weights = {k: float(v) for k, v in weights.items()}
        self.info = dict(info or {})

    @property
    def features(self) -> list[str]:
        return list(self.weights)

    def uses(self, feature: str) -> bool:
        return self.weights.get(feature, 0.0) != 0.0

    def scores(self, rows: Sequence[Mapping[str, float]]) -> list[float]:
        return [sum(w * float(r.get(f, 0.0)) for f, w in self.weights.items()) for r in rows]

    def order(self, rows: Sequence[Mapping[str, float]]) -> list[tuple[int, float]]:
        """``[(row index, score)]``, best first (the earlier row on ties: the better-ranked passage)."""
        sc = self.scores(rows)
        return sorted(enumerate(sc), key=lambda t: (-t[1], t[0]))

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, groups: Sequence[tuple[Sequence[Mapping[str, float]], Sequence[int]]], features: Sequence[str],
            l2: float = 1e-3, info: Mapping[str, Any] | None = None,
            group_weights: Sequence[float] | None = None) -> "LinearRanker":
        """Weights minimising the listwise softmax loss (module docstring) over ``groups`` of (candidate
        feature rows, indices of the gold candidates); groups without a gold candidate are skipped.
        ``group_weights`` (one per group, default 1) turns the mean over questions into a weighted mean, e.g.
        to count each kind of question as much as the reported evaluation does."""
        import torch

        feats = list(features)
        gw = list(group_weights) if group_weights is not None else [1.0] * len(groups)
        if len(gw) != len(groups):
            raise ValueError(f"{len(gw)} group weights for {len(groups)} groups")
        usable = [(rows, list(gold), float(x)) for (rows, gold), x in zip(groups, gw) if gold and len(rows) > 0]
        if not usable:
            raise DataError("no question with its answer among the candidates to fit the ranker on")
        xs = [torch.tensor([[float(r.get(f, 0.0)) for f in feats] for r in rows], dtype=torch.float64)
              for rows, _, _ in usable]
        golds = [torch.tensor(g) for _, g, _ in usable]
        qw = torch.tensor([x for _, _, x in usable], dtype=torch.float64)
        qw = qw / qw.sum()
        w = torch.zeros(len(feats), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def loss_fn() -> Any:
            per = torch.stack([torch.logsumexp(x @ w, 0) - torch.logsumexp((x @ w)[g], 0) for x, g in zip(xs, golds)])
            return (qw * per).sum() + l2 * (w * w).sum()

        def closure() -> Any:
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            loss = float(loss_fn())
            hit = torch.tensor([float(int((x @ w).argmax()) in set(g.tolist())) for x, g in zip(xs, golds)],
                               dtype=torch.float64)
            acc = float((qw * hit).sum())
        meta = {"questions": len(usable), "skipped_no_gold": len(groups) - len(usable), "loss": loss,
                "accuracy": acc, "l2": l2, **(info or {})}
        return cls(dict(zip(feats, w.detach().tolist())), meta)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "weights": self.weights, "info": self.info}

    def save(self, path: str | Path) -> None:
        from lmstack.utils.io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "LinearRanker":
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{p}: ranker file not found (the recipe's reader stage writes it)") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: not a ranker file ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("weights"), dict):
            raise DataError(f"{p}: not an lmstack ranker file (format {FORMAT} with a 'weights' table expected)")
        try:
            return cls({str(k): float(v) for k, v in d["weights"].items()}, d.get("info") or {})
        except (TypeError, ValueError):
            raise DataError(f"{p}: ranker weights must be numbers") from None
