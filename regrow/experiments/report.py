"""Tables from finished runs: ``results.json`` and a paper-style ``results.md``.

A finished run is a folder with ``summary.json`` (see :mod:`regrow.train`). Runs are grouped
by (method, sparsity); each cell gives the mean and sample standard deviation over seeds. All
runs of a report must share their setup (``SETUP_KEYS``: model, data, epochs, optimiser, ...):
runs that differ are refused, naming the fields, rather than averaged into one cell.
"""
from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

from .labels import display_name, method_order
from .runfiles import read_metrics
# summary fields aggregated per cell
FIELDS = ("test_accuracy", "best_test_accuracy", "final_density", "itop_rate", "train_flops_ratio",
          "inference_flops_ratio", "wall_seconds", "seconds_per_step")
# config fields that describe a comparison's shared setup
SETUP_KEYS = ("model", "widths", "model_options", "dataset", "epochs", "batch_size", "optimizer", "lr",
              "momentum", "weight_decay", "lr_schedule", "warmup_epochs", "label_smoothing",
              "distribution", "update_interval", "drop_fraction", "drop_schedule", "stop_fraction",
              "backend")
# setup fields that describe how sparse runs train: the dense baseline need not share them
_SPARSE_ONLY_KEYS = ("backend",)


def collect_runs(root: str | Path) -> list[dict]:
    """Summaries of every finished run under ``root`` (``root`` itself may be one run),
    each with ``run_dir`` and its per-epoch ``history`` added."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    runs = []
    for path in sorted(root.rglob("summary.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not valid JSON") from None
        summary["run_dir"] = str(path.parent)
        summary["history"] = read_metrics(path.parent)
        runs.append(summary)
    return runs


def _stat(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _shared_setup(runs: list[dict]) -> dict:
    """The value of every SETUP_KEYS field, which all runs must share.

    Raises:
        ValueError: runs differ in a setup field (averaging them into one cell would mix setups).
    """
    sparse = [r for r in runs if r["method"] != "dense"]
    setup, differing = {}, []
    for key in SETUP_KEYS:
        # the dense baseline of a `compare --backend sparse` trains on the masked backend
        group = sparse if key in _SPARSE_ONLY_KEYS and sparse else runs
        values = sorted({json.dumps(r.get("config", {}).get(key, r.get(key)), sort_keys=True) for r in group})
        if len(values) == 1:
            setup[key] = json.loads(values[0])
        else:
            differing.append(f"{key} ({', '.join(values)})")
    if differing:
        raise ValueError(f"the runs differ in {'; '.join(differing)}: averaging them would mix setups; "
                         "report each setup's runs from a folder of their own")
    return setup


def aggregate(runs: list[dict]) -> dict:
    """Cells (method, sparsity) with mean/std over seeds, the dense baseline, and the setup.

    Raises:
        ValueError: no runs, or runs that differ in a setup field (``SETUP_KEYS``).
    """
    if not runs:
        raise ValueError("no finished runs (no summary.json) to report on")
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], float(run["sparsity"])), []).append(run)
    cells = []
    for (method, sparsity), members in sorted(groups.items(), key=lambda kv: (method_order(kv[0][0]), kv[0][1])):
        members.sort(key=lambda r: r["seed"])
        cell = {"method": method, "sparsity": sparsity, "n": len(members),
                "seeds": [r["seed"] for r in members]}
        for key in FIELDS:
            values = [float(r[key]) for r in members if r.get(key) is not None]
            if values:
                cell[key] = _stat(values)
        cells.append(cell)
    setup = _shared_setup(runs)
    dense = [c for c in cells if c["method"] == "dense"]
    sparse = [c for c in cells if c["method"] != "dense"]
    return {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "setup": setup,
        "methods": sorted({c["method"] for c in sparse}, key=method_order),
        "sparsities": sorted({c["sparsity"] for c in sparse}),
        "seeds": sorted({r["seed"] for r in runs}),
        "dense": dense[0] if dense else None,
        "cells": sparse,
        "runs": [{k: v for k, v in r.items() if k not in ("history", "layers", "config")} for r in runs],
    }


def _pm(stat: dict | None, scale: float = 100.0, digits: int = 2) -> str:
    if stat is None:
        return "-"
    if len(stat["values"]) > 1:
        return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f}"


def _pct(s: float) -> str:
    return f"{100 * s:g}%"


def render_markdown(results: dict) -> str:
    """The accuracy table (rows methods, columns sparsities) and an ITOP/FLOPs table."""
    setup, sparsities = results["setup"], results["sparsities"]
    cells = {(c["method"], c["sparsity"]): c for c in results["cells"]}
    seeds = results["seeds"]
    model = setup["model"] + (f" {'-'.join(map(str, setup['widths']))}" if setup.get("widths") not in (None, []) else "")
    lines = [f"# {model} on {setup['dataset']}", ""]
    lines.append(
        f"{setup['epochs']} epochs, batch {setup['batch_size']}, {setup['optimizer']} lr {setup['lr']} "
        f"({setup['lr_schedule']}), weight decay {setup['weight_decay']}, distribution {setup['distribution']}, "
        f"dT {setup['update_interval']}, drop fraction {setup['drop_fraction']} ({setup['drop_schedule']}), "
        f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}).")
    lines += ["", "Test accuracy (%), final epoch, mean ± std over seeds; best per column in bold.", ""]
    dense = results.get("dense")
    columns = [_pct(s) for s in sparsities] or ["Test accuracy"]   # dense runs alone: one column
    lines.append("| Method | " + " | ".join(columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    if dense is not None:
        lines.append("| Dense | " + " | ".join(_pm(dense["test_accuracy"]) for _ in columns) + " |")
    best = {}
    for s in sparsities:
        means = [(cells[(m, s)]["test_accuracy"]["mean"], m) for m in results["methods"] if (m, s) in cells]
        best[s] = max(means)[1] if means else None
    for m in results["methods"]:
        row = []
        for s in sparsities:
            cell = cells.get((m, s))
            text = _pm(cell["test_accuracy"]) if cell else "-"
            row.append(f"**{text}**" if cell and best[s] == m and len(results["methods"]) > 1 else text)
        lines.append(f"| {display_name(m)} | " + " | ".join(row) + " |")

    lines += ["", "ITOP rate (fraction of weights ever active), training and inference FLOPs relative to "
              "dense (RigL paper accounting), wall time per run.", ""]
    lines.append("| Method | Sparsity | ITOP rate | Train FLOPs | Inference FLOPs | Seconds/run |")
    lines.append("|---|---|---|---|---|---|")
    rows = ([dense] if dense is not None else []) + [cells[(m, s)] for m in results["methods"]
                                                     for s in sparsities if (m, s) in cells]
    for c in rows:
        sparsity = "-" if c["method"] == "dense" else _pct(c["sparsity"])
        lines.append(f"| {display_name(c['method'])} | {sparsity} | {_pm(c.get('itop_rate'), 1, 3)} | "
                     f"{_pm(c.get('train_flops_ratio'), 1, 3)} | {_pm(c.get('inference_flops_ratio'), 1, 3)} | "
                     f"{_pm(c.get('wall_seconds'), 1, 1)} |")
    return "\n".join(lines) + "\n"


def write_report(root: str | Path, *, plots: bool = True) -> dict:
    """Write ``results.json``, ``results.md`` and (with ``plots``) the figures into ``root``.

    Returns ``{"results": results, "markdown": text, "files": [paths written]}``.
    """
    root = Path(root)
    runs = collect_runs(root)
    results = aggregate(runs)
    text = render_markdown(results)
    files = [root / "results.json", root / "results.md"]
    files[0].write_text(json.dumps(results, indent=2) + "\n")
    files[1].write_text(text)
    if plots:
        from .plots import write_plots
        files += write_plots(runs, results, root / "plots")
    return {"results": results, "markdown": text, "files": [str(f) for f in files]}
