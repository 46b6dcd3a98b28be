"""What every claim runs on: the shared protocol, one folder of runs, and the result record."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..compare import run_compare
from ..config import TrainConfig

# the README comparison's protocol: LeNet-300-100 on Fashion-MNIST, 5 epochs, 3 seeds
FULL = dict(dataset="fashion-mnist", model="mlp", widths=[300, 100], epochs=5, batch_size=128, lr=0.05,
            update_interval=50, threads=1)
# --quick: the built-in digits, a tiny MLP, one epoch (for tests; the verdicts mean nothing)
QUICK = dict(dataset="digits", model="mlp", widths=[16, 16], epochs=1, batch_size=128, lr=0.05,
             update_interval=4, threads=1)


@dataclass
class ClaimResult:
    """One claim's record in docs/claims.md."""

    number: int
    title: str
    paper: str          # the paper's sentence (paraphrased where it is a figure)
    setup: str
    table: str          # markdown
    verdict: str        # holds / partly / does not hold
    numbers: str        # the sentence with the numbers behind the verdict
    caveat: str         # why it may differ from the paper, and what would test it at paper scale
    figure: Path | None = None


@dataclass
class Context:
    """The claims' shared settings; ``compare`` runs (or reuses) runs in one folder."""

    base: TrainConfig
    seeds: list[int]
    quick: bool
    out: Path
    progress: bool = False
    log: Callable[[str], None] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    def pick(self, full, quick):
        """``full`` for the real protocol, ``quick`` under --quick."""
        return quick if self.quick else full

    def compare(self, methods: list[str], sparsities: list[float], vary: dict | None = None,
                dense: bool = False) -> list[dict]:
        """Summaries of these runs (finished ones are reused: every claim shares ``runs``)."""
        return run_compare(self.base, methods, sparsities, self.seeds, self.runs, dense=dense, vary=vary,
                           progress=self.progress, log=self.log)

    def describe(self) -> str:
        b = self.base
        widths = "-".join(map(str, b.widths)) if b.widths else "default"
        return (f"{b.model} {widths} on {b.dataset}, {b.epochs} epochs, batch {b.batch_size}, {b.optimizer} "
                f"lr {b.lr} ({b.lr_schedule}), {b.distribution}, dT {b.update_interval}, drop fraction "
                f"{b.drop_fraction}, {len(self.seeds)} seed(s)")
