"""regrow: dynamic sparse training for PyTorch.

    import regrow
    dst = regrow.DynamicSparsity(model, optimizer, method="rigl", sparsity=0.9, total_steps=T)
    ...
    loss.backward(); dst.step()

``regrow.models`` and ``regrow.data`` (the built-in model zoo and datasets) and
``regrow.export_run`` are imported on first use, so ``import regrow`` stays light.
"""
from __future__ import annotations

import importlib

from . import _moved, nn
from ._version import __version__
from .core.density import DISTRIBUTIONS, allocate_counts
from .core.schedules import DROP_SCHEDULES
from .engine import DynamicSparsity
from .export import export, format_report, load_exported, save_exported
from .methods import METHODS

_moved.install()

_LAZY = {"models": "regrow.models", "data": "regrow.data", "experiments": "regrow.experiments"}

__all__ = ["DynamicSparsity", "METHODS", "DISTRIBUTIONS", "DROP_SCHEDULES", "allocate_counts", "nn",
           "export", "export_run", "format_report", "load_exported", "save_exported", "models", "data",
           "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    if name == "export_run":
        from .experiments.export_run import export_run
        return export_run
    raise AttributeError(f"module 'regrow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
