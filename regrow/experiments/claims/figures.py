"""One figure style for every claim: lines with error bars over seeds."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def lines(series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]], *, xlabel: str,
          ylabel: str, title: str, path: Path, logx: bool = False, xticks: Sequence | None = None,
          scale: float = 100.0, styles: dict[str, dict] | None = None) -> Path:
    """``series``: label -> (xs, means, stds); y values are multiplied by ``scale``."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for label, (xs, ys, es) in series.items():
        ax.errorbar(list(xs), [scale * y for y in ys], yerr=[scale * e for e in es], marker="o", capsize=3,
                    label=label, **(styles or {}).get(label, {}))
    if logx:
        ax.set_xscale("log", base=2)
    if xticks is not None:
        ax.set_xticks(list(xticks), [f"{x:g}" if isinstance(x, float) else str(x) for x in xticks])
    return _finish(fig, ax, xlabel, ylabel, title, path)


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def scatter(points: dict[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str, title: str,
            path: Path, yscale: float = 100.0) -> Path:
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for label, (xs, ys) in points.items():
        ax.scatter(list(xs), [yscale * y for y in ys], label=label, s=22)
    return _finish(fig, ax, xlabel, ylabel, title, path)
