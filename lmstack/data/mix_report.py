"""Per-domain token shares before and after weighting, for ``lmstack data mix``.

Given each domain's size ``n_s`` (tokens; estimated as characters / chars_per_token unless a tokenizer counts
them), the mixture weights are either explicit (``w_s``, normalised) or temperature sampling
``p_s = n_s^(1/T) / sum_r n_r^(1/T)`` (Arivazhagan et al. 2019; T = 1 keeps the natural shares, T -> inf tends
to uniform). With a token budget ``B`` each domain contributes ``B * p_s`` tokens, i.e. ``B * p_s / n_s`` epochs
of it (above 1: repeated). The report lists all of that and can draw the two share bars side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.errors import ConfigError


def temperature_shares(sizes: dict[str, float], temperature: float) -> dict[str, float]:
    if not temperature > 0:
        raise ConfigError(f"mix temperature must be > 0, got {temperature}")
    live = {s: n for s, n in sizes.items() if n > 0}
    if not live:
        raise ConfigError("every domain is empty")
    z = {s: n ** (1.0 / temperature) for s, n in live.items()}
    tot = sum(z.values())
    return {s: z.get(s, 0.0) / tot for s in sizes}


def weight_shares(sizes: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(sizes))
    if unknown:
        raise ConfigError(f"weights name unknown domains {unknown}; domains: {sorted(sizes)}")
    if any(w < 0 for w in weights.values()):
        raise ConfigError("mix weights must be >= 0")
    live = {s: weights.get(s, 0.0) for s in sizes if sizes[s] > 0}
    tot = sum(live.values())
    if tot <= 0:
        raise ConfigError("mix weights are all zero (for the non-empty domains)")
    return {s: live.get(s, 0.0) / tot for s in sizes}


def mix_report(sizes: dict[str, float], *, weights: dict[str, float] | None = None, temperature: float | None = None,
               budget_tokens: float | None = None) -> dict[str, Any]:
    """Shares before (natural) and after weighting, tokens per domain under the budget and epochs of each."""
    if (weights is None) == (temperature is None):
        raise ConfigError("give exactly one of weights or temperature")
    total = sum(sizes.values())
    if total <= 0:
        raise ConfigError("every domain is empty")
    after = weight_shares(sizes, weights) if weights is not None else temperature_shares(sizes, temperature)
    budget = budget_tokens if budget_tokens is not None else total
    rows = []
    for s in sizes:
        tok = budget * after[s]
        rows.append({"domain": s, "tokens": sizes[s], "share_before": sizes[s] / total, "share_after": after[s],
                     "tokens_after": tok, "epochs": tok / sizes[s] if sizes[s] else 0.0})
    return {"method": "weights" if weights is not None else f"temperature={temperature}", "budget_tokens": budget,
            "domains": rows}


def plot_shares(report: dict[str, Any], path: str | Path) -> Path:
    from lmstack.utils.plot import new_figure, save_png

    rows = report["domains"]
    x = range(len(rows))
    fig = new_figure(max(4, 1.2 * len(rows)), 3)
    ax = fig.subplots()
    ax.bar([i - 0.2 for i in x], [r["share_before"] for r in rows], 0.4, label="before")
    ax.bar([i + 0.2 for i in x], [r["share_after"] for r in rows], 0.4, label=f"after ({report['method']})")
    ax.set_xticks(list(x), [r["domain"] for r in rows])
    ax.set_ylabel("token share")
    ax.legend()
    return save_png(fig, path)


def domain_sizes(paths: dict[str, list[str]], text_field: str = "text", chars_per_token: float = 4.0
                 ) -> dict[str, float]:
    """Estimated tokens per domain: characters of its records / chars_per_token (read with the pipeline readers)."""
    from lmstack.data.config import DataPipelineConfig
    from lmstack.data.pipeline import iter_records
    from lmstack.data.readers import ReadStats

    out = {}
    for dom, ps in paths.items():
        cfg = DataPipelineConfig(inputs=[{"path": p, "text_field": text_field} for p in ps])
        out[dom] = sum(len(r["text"]) for r in iter_records(cfg, (0, 1), ReadStats())) / chars_per_token
    return out
