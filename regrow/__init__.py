"""regrow: dynamic sparse training for PyTorch.

    import regrow
    dst = regrow.DynamicSparsity(model, optimizer, method="rigl", sparsity=0.9, total_steps=T)
    ...
    loss.backward(); dst.step()
"""
from . import nn
from .density import DISTRIBUTIONS, allocate_counts
from .engine import DynamicSparsity
from .export import export, export_run, format_report, load_exported, save_exported
from .methods import METHODS
from .schedules import DROP_SCHEDULES

__version__ = "0.1.0"
__all__ = ["DynamicSparsity", "METHODS", "DISTRIBUTIONS", "DROP_SCHEDULES", "allocate_counts", "nn",
           "export", "export_run", "format_report", "load_exported", "save_exported"]
