"""Figures for reports and training runs: matplotlib's object API (``Figure``, no pyplot), so no global state is
touched and plotting is safe in threads and servers; PNGs are written atomically or returned as bytes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def new_figure(width: float, height: float, dpi: int = 100) -> Any:
    """A matplotlib ``Figure`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def save_png(fig: Any, dest: str | Path) -> Path:
    """Lay ``fig`` out and write it to ``dest`` as PNG atomically (a reader never sees half a file)."""
    from lmstack.utils.io import atomic_write

    fig.tight_layout()
    with atomic_write(Path(dest), "wb") as f:
        fig.savefig(f, format="png")
    return Path(dest)


def png_bytes(fig: Any) -> bytes:
    """Lay ``fig`` out and return it as PNG bytes (for HTML reports that embed their figures)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
