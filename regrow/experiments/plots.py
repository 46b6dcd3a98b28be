"""Figures of a comparison (matplotlib, Agg backend, PNG).

- ``accuracy_vs_sparsity.png``: test accuracy against sparsity per method, error bars over
  seeds, the dense baseline as a band (the papers' figure);
- ``accuracy_curves.png``: test accuracy per epoch, one panel per sparsity;
- ``itop_rate.png``: ITOP rate (fraction of weights ever active) at every topology update
  against the step (per epoch for runs without ``updates.jsonl``);
- ``layer_density.png``: per-layer density of each method at the highest sparsity;
- ``masks.png``: the final masks of small layers (read from the runs' checkpoints);
- ``accuracy_vs_<key>.png`` (``compare --vary``): test accuracy against the first varied key,
  one panel per sparsity, a line per method with error bars over seeds.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .labels import display_name, method_order  # noqa: E402

MASK_MAX_NUMEL = 1_000_000   # layers drawn in masks.png: at most this many weights ...
MASK_MAX_LAYERS = 3          # ... and at most this many per method


def _colors(methods: list[str]) -> dict[str, tuple]:
    """One fixed colour per method, the same in every figure."""
    cmap = plt.get_cmap("tab10")
    return {m: cmap(method_order(m)[0] % 10) for m in methods}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _title(results: dict) -> str:
    setup = results["setup"]
    widths = setup.get("widths")
    model = setup.get("model", "model") + (f" {'-'.join(map(str, widths))}" if isinstance(widths, list) and widths else "")
    epochs = f", {setup['epochs']} epochs" if "epochs" in setup else ""
    return f"{model} on {setup.get('dataset', '?')}{epochs}"


def plot_accuracy_vs_sparsity(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = _colors(results["methods"] + ["dense"])
    dense = results.get("dense")
    if dense is not None:
        mean, std = 100 * dense["test_accuracy"]["mean"], 100 * dense["test_accuracy"]["std"]
        ax.axhline(mean, color="black", linestyle="--", linewidth=1, label="Dense")
        ax.axhspan(mean - std, mean + std, color="black", alpha=0.08, linewidth=0)
    sparsities = results["sparsities"]
    offsets = np.linspace(-0.15, 0.15, max(len(results["methods"]), 1))
    for off, method in zip(offsets, results["methods"]):
        cells = [c for c in results["cells"] if c["method"] == method]
        xs = [sparsities.index(c["sparsity"]) + off for c in cells]
        ys = [100 * c["test_accuracy"]["mean"] for c in cells]
        es = [100 * c["test_accuracy"]["std"] for c in cells]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=colors[method], label=display_name(method))
    ax.set_xticks(range(len(sparsities)), [f"{100 * s:g}%" for s in sparsities])
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(_title(results) + f", {len(results['seeds'])} seed(s)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def _curves(runs: list[dict], results: dict, key: str, ylabel: str, path: Path, scale: float,
            dense: bool = True, source: str = "history") -> Path:
    """Mean (and min-max band over seeds) of ``key`` per epoch (``source="history"``, the
    metrics.jsonl rows) or at every topology update against the step (``"update_lines"``)."""
    sparsities = results["sparsities"] or [0.0]
    fig, axes = plt.subplots(1, len(sparsities), figsize=(4.2 * len(sparsities), 3.4), squeeze=False,
                             sharey=True)
    colors = _colors(results["methods"] + ["dense"])
    for ax, sparsity in zip(axes[0], sparsities):
        for method in (["dense"] if dense and results.get("dense") else []) + results["methods"]:
            members = [r for r in runs if r["method"] == method and (method == "dense" or float(r["sparsity"]) == sparsity)]
            histories = [[row for row in r.get(source) or [] if key in row] for r in members]
            histories = [h for h in histories if h]
            if not histories:
                continue
            n = min(len(h) for h in histories)
            values = scale * np.array([[row[key] for row in h[:n]] for h in histories])
            epochs = np.array([row["step"] for row in histories[0][:n]]) if source == "update_lines" else np.arange(1, n + 1)
            mean = values.mean(0)
            style = {"linestyle": "--", "color": "black"} if method == "dense" else {"color": colors[method]}
            ax.plot(epochs, mean, marker=".", label=display_name(method), **style)
            if len(values) > 1:
                ax.fill_between(epochs, values.min(0), values.max(0), alpha=0.15, color=style["color"])
        ax.set_title(f"sparsity {100 * sparsity:g}%", fontsize=9)
        ax.set_xlabel("step" if source == "update_lines" else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(_title(results), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_curves(runs: list[dict], results: dict, path: Path) -> Path:
    return _curves(runs, results, "test_accuracy", "test accuracy (%)", path, 100.0)


def plot_itop(runs: list[dict], results: dict, path: Path) -> Path:
    """ITOP rate at every topology update (the runs' updates.jsonl) against the step, so a
    one-epoch run has a curve too; per epoch for runs written without update lines."""
    source = "update_lines" if any(r.get("update_lines") for r in runs) else "history"
    # dense is 1 throughout by definition; leaving it out keeps the sparse curves readable
    return _curves(runs, results, "itop_rate", "ITOP rate", path, 1.0, dense=bool(not results["methods"]),
                   source=source)


def _first_seed(runs: list[dict], method: str, sparsity: float) -> dict | None:
    members = [r for r in runs if r["method"] == method and float(r["sparsity"]) == sparsity]
    return min(members, key=lambda r: r["seed"]) if members else None


def plot_layer_density(runs: list[dict], results: dict, path: Path) -> Path | None:
    if not results["sparsities"]:
        return None
    sparsity = max(results["sparsities"])
    chosen = [(m, _first_seed(runs, m, sparsity)) for m in results["methods"]]
    chosen = [(m, r) for m, r in chosen if r is not None and r.get("layers")]
    if not chosen:
        return None
    layers = list(chosen[0][1]["layers"])
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(layers) * max(1, len(chosen)) / 3), 3.6))
    width = 0.8 / len(chosen)
    colors = _colors(results["methods"])
    for i, (method, run) in enumerate(chosen):
        ys = [run["layers"].get(name, {}).get("density", np.nan) for name in layers]
        ax.bar(np.arange(len(layers)) + (i - (len(chosen) - 1) / 2) * width, ys, width,
               color=colors[method], label=display_name(method))
    ax.set_xticks(range(len(layers)), layers, rotation=30 if len(layers) > 4 else 0, ha="right" if len(layers) > 4 else "center",
                  fontsize=7)
    ax.set_ylabel("final density")
    ax.set_title(f"per-layer density at {100 * sparsity:g}% sparsity (seed {chosen[0][1]['seed']})", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_masks(runs: list[dict], results: dict, path: Path) -> Path | None:
    """Final masks of up to MASK_MAX_LAYERS small layers per method, at the highest sparsity."""
    from .checkpoint import checkpoint_path, load_run_checkpoint
    if not results["sparsities"]:
        return None
    sparsity = max(results["sparsities"])
    rows = []
    for method in results["methods"]:
        run = _first_seed(runs, method, sparsity)
        if run is None or not checkpoint_path(run["run_dir"]).is_file():
            continue
        masks = load_run_checkpoint(run["run_dir"]).get("masks", {})
        small = [(name, m) for name, m in masks.items() if m.numel() <= MASK_MAX_NUMEL][:MASK_MAX_LAYERS]
        if small:
            rows.append((method, small))
    if not rows:
        return None
    ncols = max(len(small) for _, small in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.2 * ncols, 2.4 * len(rows)), squeeze=False)
    for r, (method, small) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(small):
                ax.axis("off")
                continue
            name, mask = small[c]
            grid = mask.reshape(mask.shape[0], -1).float().numpy()
            ax.imshow(grid, cmap="Greys", interpolation="nearest", aspect="auto", vmin=0, vmax=1)
            ax.set_title(f"{name} {grid.shape[0]}x{grid.shape[1]}, {100 * grid.mean():.1f}% active", fontsize=7)
            if c == 0:
                ax.set_ylabel(display_name(method), fontsize=8)
    fig.suptitle(f"final masks at {100 * sparsity:g}% sparsity (black: active; rows: output neurons)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_vs_setting(results: dict, path: Path) -> Path:
    """Accuracy against the first ``--vary`` key (other varied keys at their first value)."""
    from .grid import find_cell, value_label
    vary = results["vary"]
    key, *others = list(vary)
    fixed = {k: vary[k][0] for k in others}
    values = vary[key]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    sparsities = results["sparsities"] or [0.0]
    fig, axes = plt.subplots(1, len(sparsities), figsize=(4.4 * len(sparsities), 3.6), squeeze=False, sharey=True)
    colors = _colors(results["methods"] + ["dense"])
    for ax, sparsity in zip(axes[0], sparsities):
        for method in (["dense"] if results["dense_cells"] else []) + results["methods"]:
            pool = results["dense_cells"] if method == "dense" else results["cells"]
            cells = [find_cell(pool, method, None if method == "dense" else sparsity, {**fixed, key: v}) for v in values]
            points = [(x, c) for x, c in zip(xs, cells) if c is not None]
            if not points:
                continue
            style = {"linestyle": "--", "color": "black"} if method == "dense" else {"color": colors[method]}
            if len({id(c) for _, c in points}) == 1:   # the setting does not apply: a reference line
                style["linestyle"] = ":" if method != "dense" else "--"
            ax.errorbar([x for x, _ in points], [100 * c["test_accuracy"]["mean"] for _, c in points],
                        yerr=[100 * c["test_accuracy"]["std"] for _, c in points], marker="o", capsize=3,
                        label=display_name(method), **style)
        if numeric and max(values) / min(values) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [value_label(v) for v in values])
        ax.set_xlabel(key)
        ax.set_title(f"sparsity {100 * sparsity:g}%" + "".join(f", {k}={value_label(v)}" for k, v in fixed.items()),
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(_title(results) + f", {len(results['seeds'])} seed(s)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(runs: list[dict], results: dict, folder: str | Path) -> list[Path]:
    """Every figure that the runs allow; returns the paths written."""
    folder = Path(folder)
    written = []
    if results.get("vary"):
        from .grid import applies
        written.append(plot_accuracy_vs_setting(results, folder / f"accuracy_vs_{next(iter(results['vary']))}.png"))
        # the per-run figures below show the grid's first point
        first = {k: v[0] for k, v in results["vary"].items()}
        runs = [r for r in runs if all(r.get("config", {}).get(k) == v for k, v in first.items()
                                       if applies(r["method"], k))]
    elif results["cells"]:
        written.append(plot_accuracy_vs_sparsity(results, folder / "accuracy_vs_sparsity.png"))
    written.append(plot_accuracy_curves(runs, results, folder / "accuracy_curves.png"))
    written.append(plot_itop(runs, results, folder / "itop_rate.png"))
    for extra in (plot_layer_density(runs, results, folder / "layer_density.png"),
                  plot_masks(runs, results, folder / "masks.png")):
        if extra is not None:
            written.append(extra)
    return written
