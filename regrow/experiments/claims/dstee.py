"""The DST-EE paper's claims (Huang et al., arXiv 2211.16667)."""
from __future__ import annotations

import inspect
import json

from ...data.graphs import community_graph
from ...methods.dstee import DSTEE
from ..linkpred import train_link_prediction
from . import figures
from .context import ClaimResult, Context
from .evidence import at_least, cell, mean_std, pct, rises, table, verdict


# the link-prediction graph of claim 6: 30% of a node's links leave its community, feature noise 4
HARD_GRAPH = dict(mixing=0.3, feature_noise=4.0)
DEFAULT_C = inspect.signature(DSTEE.__init__).parameters["c"].default   # the method's own default


def _default_advice(default_ok: dict) -> str:
    """What the sweep says about regrow's default c."""
    if not default_ok:
        return ""
    if all(default_ok.values()):
        return (f"Default: regrow's c={DEFAULT_C:g} is within one pooled standard deviation of the best c at "
                f"every sparsity measured, so it stays the default.")
    worse = [f"{100 * s:g}%" for s, ok in default_ok.items() if not ok]
    return f"Default: c={DEFAULT_C:g} is behind the best c beyond noise at {', '.join(worse)}; see the table."


def exploration(ctx: Context) -> ClaimResult:
    """Claim 5 (Fig. 3): a larger c gives a higher exploration degree and a higher accuracy."""
    cs = ctx.pick([0.0, 1e-4, 1e-3, 1e-2, 1e-1], [0.0, 0.1])
    sparsities = ctx.pick([0.95, 0.98], [0.98])
    runs = ctx.compare(["dstee"], sparsities, vary={"c": cs})
    rows, series, checks, best, default_ok = [], {}, [], {}, {}
    for s in sparsities:
        acc = [cell(runs, method="dstee", sparsity=s, c=c) for c in cs]
        itop = [cell(runs, "itop_rate", method="dstee", sparsity=s, c=c) for c in cs]
        rows += [[f"{100 * s:g}%", f"{c:g}", f"{i[0]:.3f}", pct(a)] for c, a, i in zip(cs, acc, itop)]
        series[f"{100 * s:g}%"] = (list(range(len(cs))), [a[0] for a in acc], [a[1] for a in acc])
        checks += [rises(cs, [i[0] for i in itop], [i[1] for i in itop]), rises(cs, [a[0] for a in acc], [a[1] for a in acc])]
        best[s] = cs[max(range(len(cs)), key=lambda k: acc[k][0])]
        if DEFAULT_C in cs:   # is regrow's default within noise of the best c at this sparsity?
            default_ok[s] = at_least(acc[cs.index(DEFAULT_C)], acc[cs.index(best[s])])
    fig = figures.lines(series, xlabel="c", ylabel="test accuracy (%)", xticks=list(range(len(cs))),
                        title="DST-EE: exploration coefficient c", path=ctx.figures / "claim5_dstee_c.png")
    # tick labels are the c values (0 cannot sit on a log axis)
    return ClaimResult(
        5, "DST-EE: more exploration (larger c) gives more accuracy",
        "DST-EE Fig. 3: increasing the coefficient c of the exploration term raises the exploration degree "
        "(the fraction of weights ever active) and the accuracy.",
        ctx.describe() + f"; c in {cs} (x axis: their index), sparsities {sparsities}",
        table(["sparsity", "c", "exploration degree (ITOP)", "test accuracy (%)"], rows), verdict(checks),
        f"ITOP and accuracy rising with c (per sparsity, ITOP then accuracy): {checks}; best c by mean "
        f"accuracy: {best}. " + _default_advice(default_ok),
        "c multiplies ln(t)/(N+eps) against raw gradient magnitudes, so its useful range depends on the "
        "gradient scale of the model and loss; the paper tuned it on CIFAR ResNets.", fig)


def link_prediction(ctx: Context) -> ClaimResult:
    """Claim 6 (Tables 3-4): on a GNN for link prediction, DST-EE matches or beats GMP and nears dense."""
    sparsities = ctx.pick([0.8, 0.9, 0.98], [0.9])
    epochs = ctx.pick(30, 2)
    kw = ctx.pick({}, {"hidden": 16, "batch_size": 64, "update_interval": 2})
    folder = ctx.out / "gnn"
    folder.mkdir(parents=True, exist_ok=True)
    # The default graph's features give the community away, so dense, static and GMP all sit near
    # one ceiling and the claim cannot separate them; with more mixing and noisier features the
    # structure has to be learnt (measured: dense 42% Hits@50, GMP at 98% 29%).
    kw["graph"] = (community_graph(num_nodes=200, communities=5, feature_dim=8) if ctx.quick
                   else community_graph(seed=0, **HARD_GRAPH))

    def run(method: str, sparsity: float, seed: int) -> dict:
        path = folder / f"{method}-sp{sparsity:g}-seed{seed}.json"
        if path.is_file():   # resumable: one file per finished run
            return json.loads(path.read_text())
        out = train_link_prediction(method, sparsity, epochs=epochs, seed=seed, **kw)
        path.write_text(json.dumps(out, indent=2) + "\n")
        return out

    results = [run(m, s, seed) for seed in ctx.seeds for m in ("dstee", "gmp") for s in sparsities]
    results += [run("dense", 0.0, seed) for seed in ctx.seeds]
    key = "test_hits@50"
    dense = mean_std([r[key] for r in results if r["method"] == "dense"])
    rows, checks, series = [], [], {}
    for m in ("dstee", "gmp"):
        stats = [mean_std([r[key] for r in results if r["method"] == m and r["sparsity"] == s]) + (0,) for s in sparsities]
        series[m] = (sparsities, [x[0] for x in stats], [x[1] for x in stats])
        rows.append([m] + [pct(x) for x in stats])
    rows.append(["dense"] + [pct(dense)] * len(sparsities))
    for i, s in enumerate(sparsities):
        d = (series["dstee"][1][i], series["dstee"][2][i], 0)
        g = (series["gmp"][1][i], series["gmp"][2][i], 0)
        checks.append(at_least(d, g))
    near_dense = series["dstee"][1][0] >= dense[0] - 0.02
    fig = figures.lines(series, xlabel="sparsity", ylabel="test Hits@50 (%)", xticks=sparsities,
                        title="GCN link prediction (community graph)", path=ctx.figures / "claim6_gnn.png")
    return ClaimResult(
        6, "DST-EE on a GNN: matches or beats pruning from dense",
        "DST-EE Tables 3-4: on the fully connected layers of a GNN for link prediction, DST-EE at 80/90/98% "
        "(uniform) matches or beats prune-from-dense (GMP) and approaches the dense model.",
        f"built-in degree-corrected stochastic block model (2000 nodes, 20 communities, mixing "
        f"{HARD_GRAPH['mixing']}, feature noise {HARD_GRAPH['feature_noise']}), GCN encoder whose two "
        f"weight matrices are sparsified (uniform), Hadamard MLP predictor, Adam, {epochs} epochs, "
        f"{len(ctx.seeds)} seed(s); metric Hits@50 (OGB's) on held-out edges",
        table(["Method"] + [f"{100 * s:g}%" for s in sparsities], rows), verdict(checks + [near_dense]),
        f"DST-EE >= GMP within noise at {sparsities}: {checks}; DST-EE at {100 * sparsities[0]:g}% within 2 "
        f"points of dense: {near_dense}.",
        "The paper used OGB graphs (real citation/interaction networks, far larger); a generated community "
        "graph has one kind of structure, so the gaps between methods need not carry over. Running the "
        "same three methods on ogbl-collab/ogbl-ddi with the paper's encoder would test it at paper scale.", fig)
