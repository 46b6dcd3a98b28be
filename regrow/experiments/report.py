"""Tables from finished runs: ``results.json`` and a paper-style ``results.md``.

A finished run is a folder with ``summary.json`` (see :mod:`regrow.train`). Runs are grouped
by (method, sparsity); each cell gives the mean and sample standard deviation over seeds. All
runs of a report must share their setup (``SETUP_KEYS``: model, data, epochs, optimiser, ...):
runs that differ are refused, naming the fields, rather than averaged into one cell.
"""
from __future__ import annotations

import itertools
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from ..core import strict_json
from .grid import applies, find_cell, value_label
from .labels import display_name, method_order
from .runfiles import read_metrics
from .watch import read_updates
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
    each with ``run_dir``, its per-epoch ``history`` and its per-update lines (``update_lines``) added."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    runs = []
    for path in sorted(root.rglob("summary.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts) or _imp_round(path.parent):
            continue
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not valid JSON") from None
        summary["run_dir"] = str(path.parent)
        summary["history"] = read_metrics(path.parent)
        summary["update_lines"] = read_updates(path.parent)
        runs.append(summary)
    return runs


def _imp_round(folder: Path) -> bool:
    """A round of an imp run (reported through the imp run's own summary, not as a run)."""
    config = folder.parent / "config.yaml"
    return folder.name.startswith("round-") and config.is_file() and \
        (yaml.safe_load(config.read_text()) or {}).get("method") == "imp"


def _stat(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _shared_setup(runs: list[dict], varied: tuple[str, ...] = ()) -> dict:
    """The value of every SETUP_KEYS field (but the ``varied`` ones), which all runs must share.

    Raises:
        ValueError: runs differ in a setup field (averaging them into one cell would mix setups).
    """
    sparse = [r for r in runs if r["method"] != "dense"]
    setup, differing = {}, []
    for key in SETUP_KEYS:
        if key in varied:
            continue
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


def _check_same_options(method: str, members: list[dict], varied: Sequence[str]) -> None:
    """Runs averaged into one cell must not differ in a method option (unless it is varied)."""
    from .config import METHOD_OPTIONS
    for key in METHOD_OPTIONS:
        if key in varied:
            continue
        values = sorted({json.dumps(r.get("config", {}).get(key)) for r in members})
        if len(values) > 1:
            raise ValueError(f"the {method} runs differ in {key} ({', '.join(values)}): averaging them would mix "
                             f"settings; compare them with --vary {key}=... or report them from separate folders")


def run_settings(run: dict, varied: Sequence[str]) -> dict:
    """The values of the ``varied`` keys that apply to ``run``'s method, from its config."""
    return {k: run.get("config", {}).get(k) for k in varied if applies(run["method"], k)}


def aggregate(runs: list[dict], vary: Mapping[str, list] | None = None) -> dict:
    """Cells (method, sparsity[, grid settings]) with mean/std over seeds, the dense baseline,
    and the setup. ``vary``: the grid of ``compare --vary`` (key -> values in order).

    Raises:
        ValueError: no runs, or runs that differ in a setup field (``SETUP_KEYS``) not varied.
    """
    if not runs:
        raise ValueError("no finished runs (no summary.json) to report on")
    vary = {k: list(v) for k, v in (vary or {}).items()}
    varied = tuple(vary)
    for run in runs:   # values found in runs but not in the recorded grid (e.g. a method default)
        for key, value in run_settings(run, varied).items():
            if value not in vary[key]:
                vary[key].append(value)
    groups: dict[tuple[str, float, str], list[dict]] = {}
    for run in runs:
        settings = json.dumps(run_settings(run, varied), sort_keys=True)
        groups.setdefault((run["method"], float(run["sparsity"]), settings), []).append(run)
    cells = []
    for (method, sparsity, settings), members in sorted(groups.items(), key=lambda kv: (method_order(kv[0][0]), kv[0][1], kv[0][2])):
        members.sort(key=lambda r: r["seed"])
        _check_same_options(method, members, varied)
        cell = {"method": method, "sparsity": sparsity, "n": len(members),
                "seeds": [r["seed"] for r in members]}
        if varied:
            cell["settings"] = json.loads(settings)
        for key in FIELDS:
            values = [float(r[key]) for r in members if r.get(key) is not None]
            if values:
                cell[key] = _stat(values)
        cells.append(cell)
    setup = _shared_setup(runs, varied)
    dense = [c for c in cells if c["method"] == "dense"]
    sparse = [c for c in cells if c["method"] != "dense"]
    return {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "setup": setup,
        "vary": vary,
        "dense_cells": dense,
        "methods": sorted({c["method"] for c in sparse}, key=method_order),
        "sparsities": sorted({c["sparsity"] for c in sparse}),
        "seeds": sorted({r["seed"] for r in runs}),
        "dense": dense[0] if dense else None,
        "cells": sparse,
        "runs": [{k: v for k, v in r.items() if k not in ("history", "update_lines", "layers", "config")} for r in runs],
    }


def _pm(stat: dict | None, scale: float = 100.0, digits: int = 2) -> str:
    if stat is None:
        return "-"
    if len(stat["values"]) > 1:
        return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f}"


def _pct(s: float) -> str:
    return f"{100 * s:g}%"


def _render_vary(results: dict) -> list[str]:
    """Per sparsity (and per value of the other varied keys): methods x the first varied key."""
    vary = results["vary"]
    key, *others = list(vary)
    lines = []
    for sparsity in results["sparsities"]:
        for rest in itertools.product(*(vary[k] for k in others)):
            fixed = dict(zip(others, rest))
            title = f"Test accuracy (%) against {key} at {_pct(sparsity)} sparsity"
            title += "".join(f", {k} = {value_label(v)}" for k, v in fixed.items())
            lines += ["", title + " (a method that does not take the setting repeats its one value).", ""]
            lines.append("| Method | " + " | ".join(f"{key} = {value_label(v)}" for v in vary[key]) + " |")
            lines.append("|---|" + "---|" * len(vary[key]))
            for method in (["dense"] if results["dense_cells"] else []) + results["methods"]:
                pool = results["dense_cells"] if method == "dense" else results["cells"]
                row = []
                for v in vary[key]:
                    cell = find_cell(pool, method, None if method == "dense" else sparsity, {**fixed, key: v})
                    row.append(_pm(cell["test_accuracy"]) if cell else "-")
                lines.append(f"| {display_name(method)} | " + " | ".join(row) + " |")
    return lines


def render_markdown(results: dict) -> str:
    """The accuracy table (rows methods, columns sparsities) and an ITOP/FLOPs table; with a
    ``--vary`` grid, a table per sparsity over the first varied key instead."""
    if results.get("vary"):
        return _render_grid_markdown(results)
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


def _render_grid_markdown(results: dict) -> str:
    setup, seeds = results["setup"], results["seeds"]
    lines = [f"# {setup.get('model', 'model')} on {setup.get('dataset', '?')}: "
             + " x ".join(f"{k} ({', '.join(value_label(v) for v in vals)})" for k, vals in results["vary"].items()), ""]
    fixed = ", ".join(f"{k} {setup[k]}" for k in SETUP_KEYS if k in setup and setup[k] not in (None, [], {}))
    lines.append(f"{fixed}; {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}); "
                 "mean ± std over seeds, final epoch.")
    lines += _render_vary(results)
    lines += ["", "ITOP rate, training FLOPs relative to dense, wall time per run.", "",
              "| Method | Sparsity | Settings | ITOP rate | Train FLOPs | Seconds/run |", "|---|---|---|---|---|---|"]
    for c in results["dense_cells"] + results["cells"]:
        sparsity = "-" if c["method"] == "dense" else _pct(c["sparsity"])
        settings = ", ".join(f"{k}={value_label(v)}" for k, v in c.get("settings", {}).items()) or "-"
        lines.append(f"| {display_name(c['method'])} | {sparsity} | {settings} | {_pm(c.get('itop_rate'), 1, 3)} | "
                     f"{_pm(c.get('train_flops_ratio'), 1, 3)} | {_pm(c.get('wall_seconds'), 1, 1)} |")
    return "\n".join(lines) + "\n"


def read_vary(root: Path) -> dict[str, list]:
    """The ``--vary`` grid recorded in a comparison folder's compare.yaml (empty if none)."""
    path = root / "compare.yaml"
    if not path.is_file():
        return {}
    import yaml
    return dict((yaml.safe_load(path.read_text()) or {}).get("vary") or {})


def write_report(root: str | Path, *, plots: bool = True) -> dict:
    """Write ``results.json``, ``results.md`` and (with ``plots``) the figures into ``root``.

    Returns ``{"results": results, "markdown": text, "files": [paths written]}``.
    """
    root = Path(root)
    runs = collect_runs(root)
    results = aggregate(runs, read_vary(root))
    text = render_markdown(results)
    files = [root / "results.json", root / "results.md"]
    files[0].write_text(strict_json.dumps(results, indent=2) + "\n")
    files[1].write_text(text)
    if plots:
        from .plots import write_plots
        files += write_plots(runs, results, root / "plots")
    return {"results": results, "markdown": text, "files": [str(f) for f in files]}
