"""Numbers behind a verdict: means over seeds, trends, and the verdict words themselves."""
from __future__ import annotations

import statistics
from typing import Callable, Iterable, Sequence

VERDICTS = ("holds", "partly", "does not hold")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(summaries: Iterable[dict], key: str = "test_accuracy", **match) -> tuple[float, float, int]:
    """(mean, std, n) of ``key`` over the summaries whose fields (or config fields) equal ``match``."""
    chosen = [s[key] for s in summaries if all(_field(s, k) == v for k, v in match.items())]
    m, sd = mean_std(chosen)
    return m, sd, len(chosen)


def _field(summary: dict, key: str):
    if key in summary:
        return summary[key]
    return summary.get("config", {}).get(key)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 3 points."""
    if len(xs) < 3:
        return float("nan")

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else float("nan")


def rises(xs: Sequence[float], means: Sequence[float], stds: Sequence[float]) -> bool:
    """A rising trend: rank correlation >= 0.6 and the last point above the first by more than
    their pooled spread (so noise alone does not make a trend)."""
    spread = max((stds[0] ** 2 + stds[-1] ** 2) ** 0.5, 1e-12)
    return spearman(xs, means) >= 0.6 and means[-1] - means[0] > spread


def at_least(a: tuple[float, float, int], b: tuple[float, float, int]) -> bool:
    """``a`` is not below ``b`` beyond their pooled standard deviation."""
    return a[0] >= b[0] - (a[1] ** 2 + b[1] ** 2) ** 0.5


def verdict(parts: Sequence[bool]) -> str:
    """"holds" when every part holds, "does not hold" when none does, "partly" otherwise."""
    if all(parts):
        return VERDICTS[0]
    return VERDICTS[2] if not any(parts) else VERDICTS[1]


def pct(stat: tuple[float, float, int] | tuple[float, float], digits: int = 2) -> str:
    """An accuracy (0..1) as "mean ± std" in percent."""
    return f"{100 * stat[0]:.{digits}f} ± {100 * stat[1]:.{digits}f}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


Check = Callable[[], bool]
