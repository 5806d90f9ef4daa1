"""MetricsLogger: one JSON object per line in ``metrics.jsonl``, TensorBoard when installed, a loss-curve PNG.

Any stage can reuse it (pretrain, fine-tune, eval sweeps)::

    log = MetricsLogger("runs/x")
    log.log({"step": 10, "loss": 3.2, "lr": 3e-4})
    log.log({"step": 10, "val_loss": 3.4, "val_ppl": 30.0})
    log.plot()      # runs/x/loss.png (train loss, val loss; lr below); experts.png for MoE runs
    log.close()

Records carry a ``step``; train records have ``loss``, validation records ``val_loss``. MoE runs' train records
carry ``expert_utilization``: per MoE layer, the share of the routed (top-k) slots each expert received in the
step's last micro-batch (on rank 0), drawn per layer over steps in ``experts.png``. On resume,
:meth:`truncate` drops records past the checkpoint's step so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmstack.utils.io import atomic_write


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 plot: bool = True, filename: str = "metrics.jsonl"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / filename
        self.enabled = enabled
        self.plot_enabled = plot
        self.records: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.records = read_metrics(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self._tb = None

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def truncate(self, step: int) -> None:
        """Keep only records with ``step <= step`` (rewrites the file atomically)."""
        if not self.enabled:
            return
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        with atomic_write(self.path) as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: (float(v) if hasattr(v, "item") else v) for k, v in record.items()}
        self.records.append(rec)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            step = int(rec.get("step", 0))
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(("val/" if k.startswith("val_") else "train/") + k, v, step)

    def plot(self) -> Path | None:
        """Write ``loss.png`` (Agg backend, atomic). Returns its path, or None when there is nothing yet."""
        if not (self.enabled and self.plot_enabled):
            return None
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r and _finite(r["loss"])]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r and _finite(r["val_loss"])]
        lrs = [(r["step"], r["lr"]) for r in self.records if "lr" in r]
        util = [(r["step"], r["expert_utilization"]) for r in self.records if r.get("expert_utilization")]
        if util:
            plot_expert_utilization(self.run_dir / "experts.png", util)
        if not train and not val:
            return None
        return plot_curves(self.run_dir / "loss.png", train, val, lrs)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (a killed run) is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_curves(dest: Path, train: list[tuple], val: list[tuple], lrs: list[tuple]) -> Path:
    from lmstack.utils.plot import new_figure, save_png

    fig = new_figure(7, 5)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", ms=3)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if lrs:
        ax_lr.plot(*zip(*lrs), color="tab:green", lw=1)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    return save_png(fig, dest)


def plot_expert_utilization(dest: Path, util: list[tuple[int, list[list[float]]]]) -> Path:
    """One panel per MoE layer: each expert's share of the routed slots over steps, stacked to 1; the dashed
    lines are the band boundaries (k / E) of a perfectly balanced router."""
    from lmstack.utils.plot import new_figure, save_png

    n_layers = max(len(u) for _, u in util)
    util = [(s, u) for s, u in util if len(u) == n_layers]
    steps = [s for s, _ in util]
    n_exp = len(util[0][1][0])
    fig = new_figure(7, 1.6 * n_layers + 1)
    axes = fig.subplots(n_layers, 1, sharex=True, squeeze=False)[:, 0]
    for li, ax in enumerate(axes):
        shares = [[u[li][e] for _, u in util] for e in range(n_exp)]
        ax.stackplot(steps, shares, labels=[f"expert {e}" for e in range(n_exp)], linewidth=0)
        for k in range(1, n_exp):
            ax.axhline(k / n_exp, color="white", lw=0.5, ls="--")  # the balanced boundaries
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"layer {li}")
    axes[0].set_title("expert utilization: share of routed slots (dashed: balanced)")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    axes[-1].set_xlabel("step")
    return save_png(fig, dest)
