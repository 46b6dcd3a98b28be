"""The ITOP claim (Liu et al. 2021, "Do we actually need dense over-parameterization?")."""
from __future__ import annotations

from . import figures
from .context import ClaimResult, Context
from .evidence import cell, pct, spearman, table

METHODS = ("set", "rigl", "gse", "dstee")


def itop_rate(ctx: Context) -> ClaimResult:
    """Claim 8: at a fixed sparsity, accuracy rises with the ITOP rate across methods and intervals."""
    intervals = ctx.pick([25, 50, 100, 200], [2, 8])
    sparsity = 0.98
    runs = ctx.compare(list(METHODS), [sparsity], vary={"update_interval": intervals})
    rows, points, xs, ys = [], {}, [], []
    for m in METHODS:
        for dt in intervals:
            acc = cell(runs, method=m, update_interval=dt)
            itop = cell(runs, "itop_rate", method=m, update_interval=dt)
            rows.append([m, str(dt), f"{itop[0]:.3f}", pct(acc)])
            points.setdefault(m, ([], []))
            points[m][0].append(itop[0])
            points[m][1].append(acc[0])
            xs.append(itop[0])
            ys.append(acc[0])
    rho = spearman(xs, ys)
    fig = figures.scatter(points, xlabel="ITOP rate", ylabel="test accuracy (%)",
                          title=f"{100 * sparsity:g}% sparsity, update intervals {intervals}",
                          path=ctx.figures / "claim8_itop.png")
    return ClaimResult(
        8, "ITOP: more in-time over-parameterization, more accuracy",
        "ITOP (Liu et al. 2021): at a fixed sparsity, the more of the weights a run has explored (ITOP rate), "
        "the higher its accuracy, across methods and update intervals.",
        ctx.describe() + f"; sparsity {100 * sparsity:g}%, update intervals {intervals}",
        table(["method", "dT", "ITOP rate", "test accuracy (%)"], rows),
        "holds" if rho >= 0.6 else ("partly" if rho >= 0.3 else "does not hold"),
        f"Spearman rank correlation between ITOP rate and accuracy over the {len(xs)} cells: {rho:.2f} "
        "(holds at >= 0.6, partly at >= 0.3).",
        "ITOP needs enough training for explored weights to matter; with 5 epochs the shortest intervals "
        "explore most but also disturb training most.", fig)
