"""``regrow claims``: the papers' claims, each measured on data we have, with an honest verdict.

Each claim is a function of a :class:`~.context.Context` returning a
:class:`~.context.ClaimResult` (the paper's sentence, our setup, a table, a figure, the verdict
and the numbers behind it). Runs go through ``regrow compare`` into one folder, so they are
resumable and shared between claims (the GNN runs keep one JSON file each). ``run_claims``
writes ``OUT/claims.md`` and ``OUT/figures``; ``--doc-dir docs`` also writes
``docs/claims.md`` with its figures.
"""
from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from ..config import TrainConfig
from .context import FULL, QUICK, ClaimResult, Context
from .dstee import exploration, link_prediction
from .gse import distribution, subset_size, training_flops, wider_sparser
from .itop import itop_rate
from .srigl import ablation

CLAIMS: dict[int, Callable[[Context], ClaimResult]] = {
    1: subset_size, 2: distribution, 3: wider_sparser, 4: training_flops,
    5: exploration, 6: link_prediction, 7: ablation, 8: itop_rate,
}

__all__ = ["CLAIMS", "ClaimResult", "Context", "run_claims", "render"]


def run_claims(out: str | Path, *, quick: bool = False, only: Sequence[int] | None = None,
               data_dir: str | None = None, seeds: int | None = None, doc_dir: str | Path | None = None,
               command: str = "regrow claims", progress: bool = False,
               log: Callable[[str], None] | None = None) -> list[ClaimResult]:
    """Measure the claims ``only`` (default: all) into ``out`` and write the report.

    Args:
        quick: the tiny setting for tests (digits, one epoch, one seed): verdicts mean nothing.
        data_dir: Fashion-MNIST's folder (the full setting needs it).
        seeds: number of seeds (default 3, or 1 with ``quick``).
        doc_dir: also write ``DOC_DIR/claims.md`` and ``DOC_DIR/figures/claims/``.
    """
    chosen = list(only) if only else list(CLAIMS)
    unknown = [n for n in chosen if n not in CLAIMS]
    if unknown:
        raise ValueError(f"unknown claim(s) {unknown}; claims are numbered {min(CLAIMS)}-{max(CLAIMS)}")
    settings = dict(QUICK if quick else FULL)
    if not quick:
        if data_dir is None:
            raise ValueError("the claims train on Fashion-MNIST: pass --data-dir (e.g. ../shared/data/fashion-mnist)")
        settings["data_dir"] = str(data_dir)
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    ctx = Context(base=TrainConfig(**settings).validate(), seeds=list(range(n_seeds)), quick=quick, out=Path(out),
                  progress=progress, log=log)
    results = []
    for number in chosen:
        if log:
            log(f"claim {number}: {CLAIMS[number].__doc__.splitlines()[0]}")
        results.append(CLAIMS[number](ctx))
        if log:
            log(f"claim {number}: {results[-1].verdict} ({results[-1].numbers})")
    (ctx.out / "claims.md").write_text(render(results, command=command, quick=quick, figures="figures"))
    if doc_dir is not None:
        _write_doc(results, Path(doc_dir), command, quick)
    return results


def _write_doc(results: list[ClaimResult], doc_dir: Path, command: str, quick: bool) -> None:
    figures = doc_dir / "figures" / "claims"
    figures.mkdir(parents=True, exist_ok=True)
    for r in results:
        if r.figure is not None and r.figure.is_file():
            shutil.copy(r.figure, figures / r.figure.name)
    (doc_dir / "claims.md").write_text(render(results, command=command, quick=quick, figures="figures/claims"))


def render(results: list[ClaimResult], *, command: str, quick: bool, figures: str = "figures") -> str:
    """The claims report as markdown (figures linked as ``figures/<name>``, relative to it)."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = ["# Do the papers' claims hold?", "",
             f"Measured {date} with `{command}` on a 2-core CPU. Each claim: the paper's sentence, our "
             "setup, the numbers, a figure, and a verdict that follows the numbers (holds / partly / does not "
             "hold), with why it may differ at our scale.", ""]
    if quick:
        lines += ["**--quick run: tiny settings for testing the pipeline; these verdicts mean nothing.**", ""]
    lines += ["| # | claim | verdict |", "|---|---|---|"]
    lines += [f"| {r.number} | {r.title} | {r.verdict} |" for r in results]
    for r in results:
        lines += ["", f"## {r.number}. {r.title}", "", f"> {r.paper}", "", f"**Setup.** {r.setup}.", "", r.table, ""]
        if r.figure is not None:
            lines += [f"![claim {r.number}]({figures}/{r.figure.name})", ""]
        lines += [f"**Verdict: {r.verdict}.** {r.numbers}", "", f"*Why it may differ.* {r.caveat}"]
    return "\n".join(lines) + "\n"
